//! The published contract and the worker agree: `schemas/*.schema.json` and `asyncapi.yaml`
//! against `job::decode` and the worker's names.
//!
//! The schemas are what publishers validate against; `job::decode` is what the worker accepts.
//! Over a generated corpus (valid jobs of every kind, then mutations of them: missing fields,
//! wrong types, nulls, blank text, UUID variants, odd conversation ids, bad URLs and timestamps,
//! extra fields, other kinds, non-objects, and character-level fuzz of every validated field),
//! each sample is judged by both: for every kind, the kind's schema accepts the sample exactly
//! when the decoder accepts it as a job of that kind.
//!
//! JSON Schema cannot say everything the decoder does. Those rules are named ([`Gap`]) and each
//! disagreement must be explained by exactly one of them, checked on that sample:
//! - the schema accepts, the worker refuses — the rules a schema cannot see: the 256 KiB body
//!   limit, a field the worker reads appearing twice (a schema sees parsed JSON, where the last
//!   copy wins), nesting deeper than serde_json's limit inside a field the worker reads;
//! - the worker accepts, the schema refuses — where the schema is deliberately stricter so that a
//!   publisher who validates is never dead-lettered: conversation ids whose UTF-8 byte count the
//!   schema can only bound through character counts, URL spellings outside the schema's strict
//!   form, leap seconds. Such a disagreement counts only if putting a plain valid value in that
//!   one field makes the schema accept: nothing else about the sample may be in dispute.
//!
//! Every gap must actually occur in the corpus, so the documented limits are exercised, not
//! assumed.

use std::collections::BTreeMap;
use std::path::Path;

use blinger_worker::broker::headers;
use blinger_worker::contract::job::{self, Kind, Problem};
use blinger_worker::contract::reason::DeadReason;
use jsonschema::Validator;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use uuid::Uuid;

const LIMIT: usize = 256 * 1024;
const RANDOM_SAMPLES: usize = 6000;

fn root() -> &'static Path {
    test_support::repo_root()
}

fn load_json(relative: &str) -> Value {
    let path = root().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{relative}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn schema_path(kind: &str) -> String {
    format!("schemas/{kind}.schema.json")
}

/// A 2020-12 validator that also asserts `format` (publishers' validators may).
fn validator(schema: &Value) -> Validator {
    jsonschema::meta::validate(schema).expect("a valid JSON Schema");
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .expect("schema compiles")
}

fn all_reasons() -> Vec<&'static str> {
    use DeadReason::*;
    [Invalid, Rejected, RetriesExhausted, Expired, Conflict]
        .into_iter()
        .map(|r| {
            // Exhaustive on purpose: a new reason must be added to the contract too.
            match r {
                Invalid | Rejected | RetriesExhausted | Expired | Conflict => r.as_str(),
            }
        })
        .collect()
}

/// A rule the schemas cannot state exactly; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Gap {
    BodyTooLarge,
    DuplicateField,
    DeepNesting,
    ConversationIdBytes,
    FileUrlForm,
    LeapSecond,
}

const ALL_GAPS: [Gap; 6] = [
    Gap::BodyTooLarge,
    Gap::DuplicateField,
    Gap::DeepNesting,
    Gap::ConversationIdBytes,
    Gap::FileUrlForm,
    Gap::LeapSecond,
];

/// One corpus entry: the bytes the worker would receive and the JSON a schema validator sees.
struct Sample {
    label: String,
    bytes: Vec<u8>,
    value: Value,
}

impl Sample {
    fn of(label: impl Into<String>, value: Value) -> Sample {
        Sample {
            label: label.into(),
            bytes: serde_json::to_vec(&value).expect("serializes"),
            value,
        }
    }
}

struct Judge {
    schemas: Vec<(Kind, Validator)>,
}

#[derive(Debug, Default)]
struct Tally {
    accepted: usize,
    refused: usize,
    gaps: BTreeMap<Gap, usize>,
}

impl Judge {
    fn new() -> Judge {
        Judge {
            schemas: Kind::ALL
                .into_iter()
                .map(|k| (k, validator(&load_json(&schema_path(k.as_str())))))
                .collect(),
        }
    }

    fn schema_accepts(&self, kind: Kind, value: &Value) -> bool {
        self.schemas
            .iter()
            .find(|(k, _)| *k == kind)
            .is_some_and(|(_, v)| v.is_valid(value))
    }

    /// Judges one sample; panics with the sample on an unexplained disagreement.
    fn check(&self, sample: &Sample, tally: &mut Tally) {
        let decoded = job::decode(&sample.bytes, LIMIT);
        let accepting: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| self.schema_accepts(*k, &sample.value))
            .collect();
        assert!(
            accepting.len() <= 1,
            "{}: several schemas accept {}",
            sample.label,
            sample.value
        );
        let fail = |why: &str| -> ! {
            // Debug-escaped: invisible characters are often the point.
            let shown: String = format!("{:?}", sample.value.to_string())
                .chars()
                .take(600)
                .collect();
            panic!(
                "{}: {why}\n  decoder: {:?}\n  schemas accepting: {accepting:?}\n  sample: {shown}",
                sample.label,
                decoded.as_ref().map(|j| j.kind()),
            )
        };
        match (&decoded, accepting.first()) {
            (Ok(job), Some(kind)) if job.kind() == *kind => tally.accepted += 1,
            (Ok(_), Some(_)) => fail("the schema of another kind accepts"),
            (Err(_), None) => tally.refused += 1,
            (Err(e), Some(_)) => {
                let gap = match &e.problem {
                    Problem::TooLarge { .. } if sample.bytes.len() > LIMIT => Gap::BodyTooLarge,
                    Problem::NotObject(m) if m.contains("duplicate field") => Gap::DuplicateField,
                    Problem::NotJson(m) if m.contains("recursion limit") => Gap::DeepNesting,
                    _ => fail(&format!(
                        "the schema accepts what the worker refuses ({e}): the schema is unsound"
                    )),
                };
                *tally.gaps.entry(gap).or_default() += 1;
            }
            (Ok(job), None) => {
                let gap = self
                    .stricter_rule(&sample.value, job)
                    .unwrap_or_else(|| fail("the worker accepts what the schema refuses"));
                *tally.gaps.entry(gap).or_default() += 1;
            }
        }
    }

    /// The one documented rule that explains why the schema refuses a job the worker accepts:
    /// the rule applies to the sample, and a plain value in its field makes the schema accept.
    fn stricter_rule(&self, value: &Value, job: &job::Job) -> Option<Gap> {
        let kind = job.kind();
        let fixed = |field: &str, plain: Value| {
            let mut v = value.clone();
            v[field] = plain;
            self.schema_accepts(kind, &v)
        };
        let conv = &job.conversation_id;
        if conv.len() != conv.chars().count() && !conversation_id_tiers(conv) {
            return fixed("conversation_id", json!("c")).then_some(Gap::ConversationIdBytes);
        }
        if kind == Kind::SendFile && fixed("file_url", json!("https://example.com/f")) {
            return Some(Gap::FileUrlForm);
        }
        let leap = value["expires_at"]
            .as_str()
            .is_some_and(|s| s.get(17..19) == Some("60"));
        if leap && fixed("expires_at", Value::Null) {
            return Some(Gap::LeapSecond);
        }
        None
    }
}

/// The byte-limit tiers the conversation id schema states in its `$comment`, restated: any id
/// of at most 64 characters, at most 128 below U+0800, or at most 256 ASCII.
fn conversation_id_tiers(id: &str) -> bool {
    let chars = id.chars().count();
    chars <= 64
        || (chars <= 128 && id.chars().all(|c| (c as u32) < 0x800))
        || (chars <= 256 && id.is_ascii())
}

// ---------------------------------------------------------------------------------------------
// The corpus.

struct Gen {
    rng: StdRng,
}

const KNOWN: [&str; 7] = [
    "kind",
    "id",
    "conversation_id",
    "text",
    "file_url",
    "agent_id",
    "expires_at",
];

impl Gen {
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items.choose(&mut self.rng).expect("non-empty").clone()
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn uuid(&mut self) -> String {
        let id = Uuid::from_u128(self.rng.random::<u128>() | 1).to_string();
        if self.chance(0.2) {
            id.to_uppercase()
        } else {
            id
        }
    }

    fn string_from(&mut self, pool: &[&str], min: usize, max: usize) -> String {
        let n = self.rng.random_range(min..=max);
        (0..n).map(|_| self.pick(pool)).collect()
    }

    /// Conversation ids the schema describes exactly.
    fn conversation_id(&mut self) -> String {
        let id = match self.rng.random_range(0..6) {
            0 => self.uuid(),
            1 => self.string_from(&["a", "b", "z", "0", "9", "-", "_", "."], 1, 40),
            // Printable ASCII, with everything a URL cares about, up to the full 256 bytes.
            2 => {
                let len = *[1usize, 2, 255, 256].choose(&mut self.rng).expect("len");
                let len = if self.chance(0.5) {
                    self.rng.random_range(1..=256)
                } else {
                    len
                };
                (0..len)
                    .map(|_| char::from(self.rng.random_range(0x20u8..0x7f)))
                    .collect()
            }
            3 => self.string_from(
                &[
                    "é", "ü", "中", "😀", "ﬀ", "\u{a0}", "\u{2028}", "x", "/", "%", "\u{feff}",
                ],
                1,
                64,
            ),
            4 => self.string_from(&["é", "ß", "ж", "Ω", "a", "\u{7ff}"], 1, 128),
            _ => self
                .pick(&[
                    "../x",
                    "a/b",
                    "%2e%2e",
                    "?q=1",
                    "#f",
                    "...",
                    ". ",
                    " ..",
                    "ünïcödé",
                ])
                .into(),
        };
        if id == "." || id == ".." {
            "c".into()
        } else {
            id
        }
    }

    fn text(&mut self) -> String {
        match self.rng.random_range(0..5) {
            0 => self.string_from(&["Hello", " ", "world", "\n", "é", "😀", "\t"], 1, 30),
            1 => format!("  {}  ", self.string_from(&["a", "b", "中"], 1, 5)),
            2 => self
                .pick(&[
                    "\u{feff}", "\u{200b}", "\u{180e}", "x", ".", "0", "\u{1}", "\u{7f}",
                ])
                .into(),
            3 => (0..self.rng.random_range(1..200))
                .map(|_| char::from(self.rng.random_range(0x20u8..0x7f)))
                .collect(),
            _ => "Your table is ready.".into(),
        }
    }

    /// URLs in the schema's strict form (which the worker must all accept).
    fn file_url(&mut self) -> String {
        let scheme = self.pick(&["http", "https", "HTTPS", "Http"]);
        let host = if self.chance(0.15) {
            (0..4)
                .map(|_| self.rng.random_range(0..=255u32).to_string())
                .collect::<Vec<_>>()
                .join(".")
        } else {
            let mut labels: Vec<String> = (0..self.rng.random_range(0..3))
                .map(|_| self.label(false))
                .collect();
            labels.push(self.label(true));
            labels.join(".")
        };
        let port = if self.chance(0.2) {
            format!(":{}", self.rng.random_range(0..=65535u32))
        } else {
            String::new()
        };
        let rest = if self.chance(0.8) {
            let start = self.pick(&["/", "?", "#"]);
            let body: String = (0..self.rng.random_range(0..60))
                .map(|_| char::from(self.rng.random_range(0x21u8..0x7f)))
                .collect();
            format!("{start}{body}")
        } else {
            String::new()
        };
        format!("{scheme}://{host}{port}{rest}")
    }

    fn label(&mut self, last: bool) -> String {
        let first = if last {
            self.pick(&["a", "Z", "x", "_", "c"])
        } else {
            self.pick(&["a", "0", "9", "_", "c"])
        };
        let mut label = first.to_owned();
        for _ in 0..self.rng.random_range(0..8) {
            label.push_str(self.pick(&["a", "b", "0", "_", "-q", "x"]));
        }
        label
    }

    /// RFC 3339 times as the worker parses them, calendar included; never a leap second.
    fn expires_at(&mut self) -> String {
        let year = self.rng.random_range(0..=9999);
        let month = self.rng.random_range(1..=12u32);
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let days = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let day = if self.chance(0.3) {
            days
        } else {
            self.rng.random_range(1..=days)
        };
        let sep = if self.chance(0.7) {
            "T".to_owned()
        } else {
            char::from(self.rng.random_range(0u8..0x80)).to_string()
        };
        let fraction = if self.chance(0.3) {
            let digits: String = (0..self.rng.random_range(1..13))
                .map(|_| char::from(b'0' + self.rng.random_range(0..10u8)))
                .collect();
            format!(".{digits}")
        } else {
            String::new()
        };
        let offset = match self.rng.random_range(0..4) {
            0 => "Z".to_owned(),
            1 => "z".to_owned(),
            _ => format!(
                "{}{:02}:{:02}",
                self.pick(&["+", "-"]),
                self.rng.random_range(0..24),
                self.rng.random_range(0..60)
            ),
        };
        format!(
            "{year:04}-{month:02}-{day:02}{sep}{:02}:{:02}:{:02}{fraction}{offset}",
            self.rng.random_range(0..24),
            self.rng.random_range(0..60),
            self.rng.random_range(0..60),
        )
    }

    fn junk(&mut self, depth: u32) -> Value {
        match self.rng.random_range(0..if depth > 2 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => json!(self.chance(0.5)),
            2 => json!(self.rng.random_range(-1000..1000)),
            3 => json!(self.rng.random::<f64>()),
            4 => json!(self.text()),
            5 => Value::Array((0..3).map(|_| self.junk(depth + 1)).collect()),
            _ => {
                let mut m = Map::new();
                for i in 0..3 {
                    m.insert(format!("k{i}"), self.junk(depth + 1));
                }
                Value::Object(m)
            }
        }
    }

    /// A valid job of `kind`, sometimes with extra fields and with the other kinds' fields.
    fn job(&mut self, kind: Kind) -> Map<String, Value> {
        let mut job = Map::new();
        job.insert("kind".into(), kind.as_str().into());
        job.insert("id".into(), self.uuid().into());
        job.insert("conversation_id".into(), self.conversation_id().into());
        match kind {
            Kind::SendText => {
                job.insert("text".into(), self.text().into());
            }
            Kind::SendFile => {
                job.insert("file_url".into(), self.file_url().into());
            }
            Kind::AssignAgent => {
                job.insert("agent_id".into(), self.text().into());
            }
            Kind::RequestReview => {}
        }
        match self.rng.random_range(0..4) {
            0 => {
                job.insert("expires_at".into(), self.expires_at().into());
            }
            1 => {
                job.insert("expires_at".into(), Value::Null);
            }
            _ => {}
        }
        if self.chance(0.3) {
            for i in 0..self.rng.random_range(1..4) {
                job.insert(format!("extra_{i}"), self.junk(0));
            }
        }
        // Another kind's field, of any type: ignored by this kind.
        if self.chance(0.2) {
            let (field, owner) = self.pick(&[
                ("text", Kind::SendText),
                ("file_url", Kind::SendFile),
                ("agent_id", Kind::AssignAgent),
            ]);
            if owner != kind {
                job.insert(field.into(), self.junk(0));
            }
        }
        job
    }

    /// One character inserted, removed or replaced.
    fn fuzz(&mut self, s: &str) -> String {
        let mut chars: Vec<char> = s.chars().collect();
        let pool = [
            '0', '9', 'a', 'f', 'g', 'F', 'Z', 'z', 'T', '-', ':', '.', '/', '@', '\\', ' ', '\n',
            '\u{0}', '\u{7f}', '\u{85}', '\u{a0}', 'é', '😀', '%', '[', '?', '#', '+', '_', '6',
        ];
        let c = self.pick(&pool);
        match self.rng.random_range(0..3) {
            0 if !chars.is_empty() => {
                let i = self.rng.random_range(0..chars.len());
                chars.remove(i);
            }
            1 if !chars.is_empty() => {
                let i = self.rng.random_range(0..chars.len());
                chars[i] = c;
            }
            _ => {
                let i = self.rng.random_range(0..=chars.len());
                chars.insert(i, c);
            }
        }
        chars.into_iter().collect()
    }

    /// A valid job, then (usually) one mutation.
    fn sample(&mut self, n: usize) -> Sample {
        let kind = self.pick(&Kind::ALL);
        let mut job = self.job(kind);
        let mutation = self.rng.random_range(0..14);
        let label = format!("random #{n} ({kind}, mutation {mutation})");
        let wrong = [
            Value::Null,
            json!(7),
            json!(true),
            json!([]),
            json!({}),
            json!(""),
        ];
        match mutation {
            0 | 1 => {} // unchanged: valid
            2 => {
                let field = self.pick(&KNOWN);
                job.remove(field);
            }
            3 => {
                let field = self.pick(&KNOWN);
                let value = self.pick(&wrong);
                job.insert(field.into(), value);
            }
            4 => {
                let kind = self.pick(&[
                    "send-text",
                    "send-file",
                    "request-review",
                    "assign-agent",
                    "send-sms",
                    "SEND-TEXT",
                    " send-text",
                    "",
                ]);
                job.insert("kind".into(), kind.into());
            }
            5 | 6 => {
                let id = job["id"].as_str().unwrap_or_default().to_owned();
                job.insert("id".into(), self.fuzz(&id).into());
            }
            7 => {
                let conv = job["conversation_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let fuzzed = self.fuzz(&conv);
                // Stay within the tiers: the byte-count gap has its own samples.
                if conversation_id_tiers(&fuzzed) {
                    job.insert("conversation_id".into(), fuzzed.into());
                }
            }
            8 | 9 => {
                let at = self.expires_at();
                job.insert("expires_at".into(), self.fuzz(&at).into());
            }
            10 | 11 if kind == Kind::SendFile => {
                let url = job["file_url"].as_str().unwrap_or_default().to_owned();
                job.insert("file_url".into(), self.fuzz(&url).into());
            }
            12 => {
                let field = match kind {
                    Kind::SendText => "text",
                    Kind::AssignAgent => "agent_id",
                    _ => "conversation_id",
                };
                let blank = self.pick(&[
                    "",
                    " ",
                    "\t\n",
                    "\u{a0}",
                    "\u{3000}",
                    "\u{85}",
                    "\u{2028}",
                    "\u{b}",
                    "\u{c}",
                    "\r",
                    " \u{2000}\u{200a} ",
                ]);
                job.insert(field.into(), blank.into());
            }
            _ => {
                let text = self.text();
                job.insert("text".into(), self.fuzz(&text).into());
            }
        }
        Sample::of(label, Value::Object(job))
    }
}

fn fixed_cases(g: &mut Gen) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut with = |g: &mut Gen, kind: Kind, label: &str, field: &str, value: Value| {
        let mut job = g.job(kind);
        job.remove("expires_at");
        job.insert(field.into(), value);
        out.push(Sample::of(
            format!("{kind} {label} {field}"),
            Value::Object(job),
        ));
    };
    for kind in Kind::ALL {
        for id in [
            "554f11c1-ec1e-4fdb-9953-bfad33013f58",
            "554F11C1-EC1E-4FDB-9953-BFAD33013F58",
            "{554f11c1-ec1e-4fdb-9953-bfad33013f58}",
            "554f11c1ec1e4fdb9953bfad33013f58",
            "urn:uuid:554f11c1-ec1e-4fdb-9953-bfad33013f58",
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "554f11c1-ec1e-4fdb-9953-bfad33013f5g",
            "554f11c1-ec1e4-fdb-9953-bfad33013f58",
            " 554f11c1-ec1e-4fdb-9953-bfad33013f58",
            "554f11c1-ec1e-4fdb-9953-bfad33013f58\n",
            "554f11c1-ec1e-4fdb-9953-bfad33013f5８",
            "554f11c1-ec1e-4fdb-9953_bfad33013f58",
            "",
        ] {
            with(g, kind, "id", "id", json!(id));
        }
        let long = |s: &str, n: usize| s.repeat(n);
        for conv in [
            String::new(),
            ".".into(),
            "..".into(),
            "...".into(),
            "a\nb".into(),
            "a\u{0}b".into(),
            "\u{7f}".into(),
            "x\u{85}".into(),
            "x\u{9f}".into(),
            "\u{a0}".into(),
            long("x", 256),
            long("x", 257),
            long("é", 128),
            long("é", 129),
            long("😀", 64),
            long("😀", 65),
            long("中", 64),
            // Within 256 bytes but beyond every tier: the byte-count gap.
            format!("{}{}", long("a", 100), long("é", 50)),
            format!("{}{}", long("a", 200), long("é", 28)),
            long("中", 85),
            format!("{}{}", long("é", 100), long("😀", 14)),
            // Over 256 bytes: both refuse.
            format!("{}{}", long("a", 200), long("é", 29)),
            long("中", 86),
        ] {
            with(g, kind, "conversation_id", "conversation_id", json!(conv));
        }
        for at in [
            "2030-01-02T03:04:05Z",
            "2030-01-02t03:04:05z",
            "2030-01-02 03:04:05+02:00",
            "2030-01-02x03:04:05-23:59",
            "2030-01-02T03:04:05.123456789123Z",
            "2000-02-29T00:00:00Z",
            "0000-02-29T00:00:00Z",
            "2024-02-29T00:00:00Z",
            "2030-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2030-04-31T00:00:00Z",
            "2030-13-01T00:00:00Z",
            "2030-00-01T00:00:00Z",
            "2030-01-00T00:00:00Z",
            "2030-01-02T24:00:00Z",
            "2030-01-02T23:60:00Z",
            "2030-01-02T03:04:05+24:00",
            "2030-01-02T03:04:05+05:60",
            "2030-01-02T03:04Z",
            "2030-01-02T03:04:05",
            "2030-01-02T03:04:05.Z",
            "2030-01-02T03:04:05Zjunk",
            "2030-01-02",
            "tomorrow",
            "2030-01-02é03:04:05Z",
            "+2030-01-02T03:04:05Z",
            "2030-1-02T03:04:05Z",
            // Leap seconds: the worker takes them at the last second of a UTC month only.
            "2016-12-31T23:59:60Z",
            "2016-12-31T18:59:60-05:00",
            "2016-06-30T23:59:60.5Z",
            "2016-06-15T23:59:60Z",
            "2016-12-31T23:59:60+01:00",
        ] {
            with(g, kind, "expires_at", "expires_at", json!(at));
        }
        for bad in [json!(5), json!(true), json!({}), json!([]), Value::Null] {
            with(g, kind, "typed", "expires_at", bad);
        }
        for kind_value in [
            json!("send-sms"),
            json!("Send-Text"),
            json!(null),
            json!(1),
            json!(""),
        ] {
            with(g, kind, "kind", "kind", kind_value);
        }
    }
    for text in [
        "",
        " ",
        "\t",
        "\n\r",
        "\u{a0}",
        "\u{85}",
        "\u{1680}",
        "\u{2000}",
        "\u{200a}",
        "\u{2028}",
        "\u{2029}",
        "\u{202f}",
        "\u{205f}",
        "\u{3000}",
        "\u{b}\u{c}",
        "\u{feff}",
        "\u{200b}",
        "\u{180e}",
        " a ",
        "\u{0}",
        "\u{7f}",
    ] {
        with(g, Kind::SendText, "blank", "text", json!(text));
        with(g, Kind::AssignAgent, "blank", "agent_id", json!(text));
    }
    for url in [
        "https://cdn.example.com/a.png",
        "HTTP://EXAMPLE.COM/",
        "http://127.0.0.1:8080/x",
        "http://localhost",
        "https://a_b.example.com/x",
        "http://host:65535/",
        "http://host:0/",
        "http://host:00080/",
        "https://example.com/?q=a b",
        "/relative.png",
        "ftp://example.com/a",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "http://",
        "",
        "https://exa mple.com/",
        "http://xn--a.com/",
        "http://1.2.3.256/",
        "http://999999999999/",
        "http://a.123/",
        "http://a.0x1/",
        "http://host:99999/",
        "http://host:65536/",
        "http://[::1/",
        // Accepted by the worker, outside the schema's strict form.
        "http://[::1]/",
        "http:example.com",
        "http:/example.com",
        " http://example.com",
        "http://example.com/ü",
        "http://ü.example.com/",
        "http://user:pw@example.com/",
        "http://a..b/",
        "http://-a.com/",
        "http://example.com:/",
        "http://exam\tple.com/",
        "http://%41.com/",
        "http://example.com\\path",
        "http://example.com.",
        "http://1.2.3.4.5.example/",
        "http://xn--bcher-kva.example/",
    ] {
        with(g, Kind::SendFile, "url", "file_url", json!(url));
    }
    let path = "a".repeat(4096 - "https://example.com/".len());
    with(
        g,
        Kind::SendFile,
        "4096-byte",
        "file_url",
        json!(format!("https://example.com/{path}")),
    );
    with(
        g,
        Kind::SendFile,
        "4097-byte",
        "file_url",
        json!(format!("https://example.com/{path}b")),
    );

    // Not objects, and objects without a kind.
    for doc in [
        json!([]),
        json!(["send-text"]),
        json!("send-text"),
        json!(1),
        json!(null),
        json!(true),
        json!({}),
    ] {
        out.push(Sample::of(format!("document {doc}"), doc));
    }

    // The rules no schema can see.
    let mut big = g.job(Kind::SendText);
    big.insert("text".into(), json!("x".repeat(LIMIT)));
    out.push(Sample::of("body over 256 KiB", Value::Object(big)));
    let mut just = g.job(Kind::RequestReview);
    just.remove("expires_at");
    let base = serde_json::to_vec(&Value::Object(just.clone()))
        .expect("json")
        .len();
    just.insert(
        "pad".into(),
        json!("p".repeat(LIMIT - base - r#","pad":"""#.len())),
    );
    let sample = Sample::of("body of exactly 256 KiB", Value::Object(just));
    assert_eq!(sample.bytes.len(), LIMIT);
    out.push(sample);

    let id = Uuid::new_v4();
    let raw = format!(
        r#"{{"kind":"send-text","id":"{id}","conversation_id":"c","text":"a","text":"b"}}"#
    );
    out.push(Sample {
        label: "repeated field".into(),
        value: serde_json::from_str(&raw).expect("last copy wins"),
        bytes: raw.into_bytes(),
    });
    let raw =
        format!(r#"{{"kind":"request-review","id":"{id}","conversation_id":"c","x":1,"x":2}}"#);
    out.push(Sample {
        label: "repeated unknown field".into(),
        value: serde_json::from_str(&raw).expect("parses"),
        bytes: raw.into_bytes(),
    });

    for (field, depth) in [("text", 200), ("x", 200), ("text", 100)] {
        let mut nested = json!(1);
        for _ in 0..depth {
            nested = json!([nested]);
        }
        let mut job = g.job(Kind::RequestReview);
        job.remove("text");
        job.insert(field.into(), nested);
        out.push(Sample::of(
            format!("request-review with {field} nested {depth} deep"),
            Value::Object(job),
        ));
    }
    out
}

#[test]
fn schemas_and_decoder_agree_over_a_generated_corpus() {
    let judge = Judge::new();
    let mut g = Gen {
        rng: StdRng::seed_from_u64(0x5eed_b11e),
    };
    let mut tally = Tally::default();
    let fixed = fixed_cases(&mut g);
    let total = fixed.len() + RANDOM_SAMPLES;
    for sample in &fixed {
        judge.check(sample, &mut tally);
    }
    for n in 0..RANDOM_SAMPLES {
        judge.check(&g.sample(n), &mut tally);
    }
    println!("{total} samples: {tally:?}");
    assert!(total >= 5000);
    assert!(tally.accepted > 1000 && tally.refused > 1000, "{tally:?}");
    for gap in ALL_GAPS {
        assert!(
            tally.gaps.get(&gap).copied().unwrap_or(0) > 0,
            "documented gap {gap:?} never occurred: {tally:?}"
        );
    }
    // The gaps are the exception: the schemas are exact almost everywhere.
    let gaps: usize = tally.gaps.values().sum();
    assert!(gaps * 20 < total, "{tally:?}");
}

#[test]
fn schemas_share_their_definitions_and_match_the_kinds() {
    let mut shared: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for kind in Kind::ALL {
        let path = schema_path(kind.as_str());
        let schema = load_json(&path);
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{path}"
        );
        assert_eq!(
            schema["properties"]["kind"]["const"],
            kind.as_str(),
            "{path}"
        );
        let own = match kind {
            Kind::SendText => Some("text"),
            Kind::SendFile => Some("file_url"),
            Kind::AssignAgent => Some("agent_id"),
            Kind::RequestReview => None,
        };
        let mut required = vec!["kind", "id", "conversation_id"];
        required.extend(own);
        assert_eq!(schema["required"], json!(required), "{path}");
        assert_eq!(schema["additionalProperties"], json!(true), "{path}");
        // A definition repeated in several files must be the same everywhere.
        let defs = schema["$defs"].as_object().expect("$defs");
        for (name, def) in defs {
            match shared.get(name) {
                Some((first, seen)) => {
                    assert_eq!(seen, def, "$defs/{name} differs between {first} and {path}")
                }
                None => {
                    shared.insert(name.clone(), (path.clone(), def.clone()));
                }
            }
        }
        // Their own examples are valid jobs of their kind.
        let v = validator(&schema);
        for example in schema["examples"].as_array().expect("examples") {
            assert!(v.is_valid(example), "{path}: {example}");
            let job = job::decode(example.to_string().as_bytes(), LIMIT).expect("decodes");
            assert_eq!(job.kind(), kind);
        }
    }
    let limits = load_json(&schema_path("send-file"));
    assert_eq!(
        limits["$defs"]["file_url"]["maxLength"],
        json!(job::MAX_FILE_URL_BYTES)
    );
}

#[test]
fn receipt_schema_states_the_receipt_shape() {
    let schema = load_json("schemas/receipt.schema.json");
    let v = validator(&schema);
    let mut kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    kinds.push("unknown");
    assert_eq!(schema["properties"]["kind"]["enum"], json!(kinds));
    let mut reasons: Vec<Value> = all_reasons().into_iter().map(Value::from).collect();
    reasons.push(Value::Null);
    assert_eq!(schema["properties"]["reason"]["enum"], json!(reasons));
    let required: Vec<&str> = schema["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        required,
        [
            "id",
            "kind",
            "conversation_id",
            "outcome",
            "reason",
            "blinger_message_id",
            "blinger_status",
            "http_status",
            "attempts",
            "received_at",
            "finished_at"
        ]
    );

    let delivered = schema["examples"][0].clone();
    assert!(v.is_valid(&delivered));
    let mutate = |f: &dyn Fn(&mut Value)| {
        let mut r = delivered.clone();
        f(&mut r);
        v.is_valid(&r)
    };
    assert!(mutate(&|r| r["surprise"] = json!("new fields are allowed")));
    assert!(
        !mutate(&|r| r["reason"] = json!("rejected")),
        "delivered has no reason"
    );
    assert!(
        !mutate(&|r| {
            r["outcome"] = json!("dead-lettered");
        }),
        "dead-lettered needs a reason"
    );
    assert!(mutate(&|r| {
        r["outcome"] = json!("dead-lettered");
        r["reason"] = json!("expired");
    }));
    assert!(
        !mutate(&|r| {
            r.as_object_mut().expect("object").remove("blinger_status");
        }),
        "every field is present, null when it does not apply"
    );
    assert!(!mutate(&|r| r["http_status"] = json!(99)));
    assert!(!mutate(&|r| r["attempts"] = json!(-1)));
    assert!(!mutate(&|r| r["attempts"] = json!(1.5)));
    assert!(!mutate(&|r| r["finished_at"] = json!("yesterday")));
    assert!(!mutate(&|r| r["kind"] = json!("send-sms")));
    for example in schema["examples"].as_array().expect("examples") {
        assert!(v.is_valid(example), "{example}");
    }
}

fn yaml(relative: &str) -> Value {
    let text = std::fs::read_to_string(root().join(relative)).expect("asyncapi.yaml");
    serde_yaml_ng::from_str(&text).expect("valid YAML")
}

/// Follows a local `#/...` reference.
fn resolve<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) if r.starts_with("#/") => {
            let target = doc
                .pointer(&r[1..])
                .unwrap_or_else(|| panic!("dangling reference {r}"));
            resolve(doc, target)
        }
        _ => node,
    }
}

/// Every `$ref` string anywhere in the document.
fn refs(node: &Value, out: &mut Vec<String>) {
    match node {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn asyncapi_examples_validate_and_names_match_the_code() {
    let doc = yaml("asyncapi.yaml");
    assert!(doc["asyncapi"].as_str().expect("version").starts_with("3."));

    // Every reference resolves: local ones to a node, file ones to an existing file.
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in &all {
        match r.strip_prefix('#') {
            Some(pointer) => assert!(doc.pointer(pointer).is_some(), "dangling {r}"),
            None => assert!(root().join(r).is_file(), "missing file {r}"),
        }
    }

    let mut examples = 0;
    let messages = doc["components"]["messages"].as_object().expect("messages");
    for (name, message) in messages {
        let payload = &message["payload"];
        let payload_schema = match payload["schema"]["$ref"].as_str() {
            Some(file) => {
                assert_eq!(
                    payload["schemaFormat"], "application/schema+json;version=draft-2020-12",
                    "{name}"
                );
                Some(validator(&load_json(file)))
            }
            None => None,
        };
        let headers_schema = message
            .get("headers")
            .map(|h| jsonschema::draft7::new(resolve(&doc, h)).expect("headers schema compiles"));
        for example in message["examples"].as_array().expect("examples") {
            examples += 1;
            let label = format!("{name}/{}", example["name"]);
            if let Some(v) = &payload_schema {
                assert!(v.is_valid(&example["payload"]), "{label}");
            }
            if let Some(v) = &headers_schema {
                assert!(v.is_valid(&example["headers"]), "{label}");
            }
            // A job example is a job the worker accepts, of the message's kind.
            if let Some(kind) = Kind::parse(message["name"].as_str().unwrap_or_default()) {
                let job = job::decode(example["payload"].to_string().as_bytes(), LIMIT)
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(job.kind(), kind, "{label}");
            }
        }
    }
    assert!(examples >= 10);

    // The routing keys: one receive operation per kind; receipts delivered.<kind>, dead.<kind>.
    let cc = |op: &str| -> Vec<String> {
        doc["operations"][op]["bindings"]["amqp"]["cc"]
            .as_array()
            .unwrap_or_else(|| panic!("operation {op}"))
            .iter()
            .map(|k| k.as_str().expect("string").to_owned())
            .collect()
    };
    let mut received = Vec::new();
    for op in [
        "receiveSendText",
        "receiveSendFile",
        "receiveRequestReview",
        "receiveAssignAgent",
    ] {
        received.extend(cc(op));
    }
    let kinds: Vec<String> = Kind::ALL.iter().map(|k| k.as_str().to_owned()).collect();
    assert_eq!(received, kinds);
    let prefixed = |p: &str| kinds.iter().map(|k| format!("{p}.{k}")).collect::<Vec<_>>();
    assert_eq!(cc("sendDeliveredReceipt"), prefixed("delivered"));
    let mut dead = prefixed("dead");
    dead.push("dead.unknown".into());
    assert_eq!(cc("sendDeadReceipt"), dead);

    // Names as the worker uses them.
    assert_eq!(doc["channels"]["jobs"]["address"], "blinger.outbound");
    assert_eq!(
        doc["channels"]["jobs"]["bindings"]["amqp"]["exchange"]["type"],
        "topic"
    );
    assert_eq!(
        doc["channels"]["deadLetters"]["address"],
        "blinger.outbound.dead"
    );
    assert_eq!(
        doc["channels"]["receipts"]["address"],
        "blinger.outbound.events"
    );
    let dl = &doc["components"]["schemas"]["deadLetterHeaders"]["properties"];
    assert_eq!(dl[headers::REASON]["enum"], json!(all_reasons()));
    for name in [
        headers::REASON,
        headers::ERROR,
        headers::STATUS,
        headers::ATTEMPTS,
        headers::RETRIES,
        headers::FIRST_SEEN,
    ] {
        assert!(dl.get(name).is_some(), "header {name} undocumented");
    }
}

#[test]
fn receipts_built_by_the_worker_match_the_schema() {
    use blinger_worker::contract::receipts::{Outcome, Receipt, timestamp};
    let v = validator(&load_json("schemas/receipt.schema.json"));
    let delivered = Receipt {
        id: Some("554f11c1-ec1e-4fdb-9953-bfad33013f58".into()),
        kind: "send-text".into(),
        conversation_id: Some("e1d247c8-5cd8-4f93-b9d7-15fd3259ac22".into()),
        outcome: Outcome::Delivered,
        reason: None,
        blinger_message_id: Some("5f0c6b5e2a1d4c0012345678".into()),
        blinger_status: Some("delivered".into()),
        http_status: Some(200),
        attempts: 1,
        received_at: timestamp(1_893_553_445_120),
        finished_at: timestamp(1_893_553_445_480),
    };
    let mut receipts = vec![delivered.clone()];
    for reason in all_reasons() {
        receipts.push(Receipt {
            outcome: Outcome::DeadLettered,
            reason: Some(reason),
            blinger_message_id: None,
            blinger_status: None,
            http_status: (reason == "rejected").then_some(422),
            ..delivered.clone()
        });
    }
    receipts.push(Receipt {
        id: None,
        kind: "unknown".into(),
        conversation_id: None,
        outcome: Outcome::DeadLettered,
        reason: Some("invalid"),
        blinger_message_id: None,
        blinger_status: None,
        http_status: None,
        attempts: 0,
        ..delivered.clone()
    });
    let doc = yaml("asyncapi.yaml");
    let mut keys = Vec::new();
    for op in ["sendDeliveredReceipt", "sendDeadReceipt"] {
        for key in doc["operations"][op]["bindings"]["amqp"]["cc"]
            .as_array()
            .expect("cc")
        {
            keys.push(key.as_str().expect("key").to_owned());
        }
    }
    for receipt in &receipts {
        let json = serde_json::to_value(receipt).expect("serializes");
        assert!(v.is_valid(&json), "{json}");
        assert!(
            keys.contains(&receipt.routing_key()),
            "{} is not a documented routing key",
            receipt.routing_key()
        );
    }
}

/// The metrics contract that the dashboard and alert rules are checked against in CI
/// (`.ci/metrics-contract.py`) keeps its label values as literals on purpose: dashboards rely on
/// them, so they change only by a deliberate edit there. This holds the code to that list: a
/// kind or a dead-letter reason added in code but not to the contract fails here.
#[test]
fn the_metrics_contract_lists_the_kinds_and_reasons_of_the_code() {
    let script = std::fs::read_to_string(root().join(".ci/metrics-contract.py"))
        .expect(".ci/metrics-contract.py");
    let set = |name: &str| -> std::collections::BTreeSet<String> {
        let line = script
            .lines()
            .find(|l| l.starts_with(&format!("{name} = {{")))
            .unwrap_or_else(|| panic!("{name} = {{...}} in .ci/metrics-contract.py"));
        let inside = line
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map(|(inside, _)| inside)
            .expect("a one-line set literal");
        inside
            .split(',')
            .map(|v| v.trim().trim_matches('"').to_owned())
            .filter(|v| !v.is_empty())
            .collect()
    };
    let mut kinds: std::collections::BTreeSet<String> =
        Kind::ALL.iter().map(|k| k.as_str().to_owned()).collect();
    kinds.insert("unknown".into());
    assert_eq!(set("KINDS"), kinds);
    let reasons = all_reasons().into_iter().map(str::to_owned).collect();
    assert_eq!(set("REASONS"), reasons);
}
