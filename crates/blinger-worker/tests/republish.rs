//! Republishes against the real RabbitMQ: each confirm is exactly its own (issue 11).
//!
//! A mandatory publish to a queue that does not exist is returned and then acked. lapin hands a
//! return to whichever confirm it resolves next, so on a channel with concurrent publishes a
//! returned park could be taken for confirmed (and its job acked and lost) while a good one is
//! reported unroutable. The worker's [`Republisher`] carries one publish per channel at a time.

use std::time::Duration;

use blinger_worker::broker::{AmqpError, Republisher, republisher};
use futures_util::future::join_all;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_republish_is_judged_by_its_own_confirm() {
    let broker = test_support::broker().await;
    let conn = Connection::connect(&broker.url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable");
    let admin = conn.create_channel().await.unwrap();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let queue = format!("t.republish.{tag}");
    let missing = format!("t.republish.{tag}.missing");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    let republisher = Republisher::open(&conn, republisher::CHANNELS)
        .await
        .unwrap();

    // Rounds of concurrent publishes, every third one to a queue that does not exist: what a
    // park to a deleted tier queue looks like among the other parks and dead letters.
    const ROUNDS: usize = 20;
    const PER_ROUND: usize = 1000;
    let mut wrong = Vec::new();
    let mut routed = 0u32;
    for round in 0..ROUNDS {
        let results = join_all((0..PER_ROUND).map(|i| {
            let target = if i % 3 == 0 { &missing } else { &queue };
            let body = format!("{round}-{i}").into_bytes();
            let republisher = &republisher;
            async move {
                let result = republisher
                    .publish(
                        target,
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await;
                (i, result)
            }
        }))
        .await;
        for (i, result) in results {
            match (i % 3 == 0, &result) {
                (true, Err(AmqpError::Unroutable(_))) => {}
                (false, Ok(())) => routed += 1,
                _ => wrong.push(format!("round {round} publish {i}: {result:?}")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} publishes judged by another publish's confirm, e.g. {:?}",
        wrong.len(),
        ROUNDS * PER_ROUND,
        &wrong[..wrong.len().min(5)]
    );
    // What was confirmed is in the queue, and nothing else.
    let count = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ready = blinger_worker::broker::topology::ready_count(&admin, &queue)
                .await
                .unwrap()
                .expect("the queue exists");
            if ready >= routed {
                return ready;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("confirmed publishes are in the queue");
    assert_eq!(count, routed);
    let _ = admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    republisher.close().await;
    let _ = conn.close(200, "bye".into()).await;
}
