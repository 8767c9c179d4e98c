//! Operator commands: `publish`, `dlq` and `store`, the tools on-call uses to feed, inspect and
//! repair the worker without writing scripts.
//!
//! Each command is one module with its clap arguments, its logic and its thiserror error; the
//! binary only wires them to the command line. What they share lives here:
//! - talking to the broker the same way the worker does (the same [`AmqpSettings`], a connection
//!   whose errors never show the password, publisher confirms judged one way);
//! - output: aligned tables or JSON on stdout, progress bars on stderr only when stderr is a
//!   terminal, so piped output stays machine-readable and logs stay clean.

pub mod dlq;
pub mod publish;
pub mod store_cmd;

use std::borrow::Cow;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};

use crate::broker::{self, AmqpError};
use crate::config::{AmqpSettings, AmqpUrlError, amqp_uris};

/// One connection with one channel, closed politely by [`Link::close`].
pub(crate) struct Link {
    pub connection: Connection,
    pub channel: Channel,
}

impl Link {
    /// Connects with the worker's settings. `confirm` puts the channel in publisher-confirm mode.
    /// A malformed `AMQP_URL` is refused before connecting, by an error that quotes none of it.
    pub(crate) async fn open<E: From<AmqpError> + From<AmqpUrlError>>(
        settings: &AmqpSettings,
        name: &str,
        confirm: bool,
    ) -> Result<Link, E> {
        amqp_uris(&settings.url)?;
        let connection = broker::connect(settings, name).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::Channel)?;
        if confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(AmqpError::Channel)?;
        }
        Ok(Link {
            connection,
            channel,
        })
    }

    pub(crate) async fn close(&self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

pub use crate::broker::confirms::ConfirmError;

/// A progress bar on stderr when stderr is a terminal, otherwise one that draws nothing, so that
/// piped or logged output never fills with escape sequences.
pub(crate) fn progress(len: Option<u64>, message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {msg} {pos} ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A short age such as `45s`, `12m`, `3h20m`, `4d2h`: enough to triage, short enough for a table.
pub(crate) fn human_age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => compound(s / 3600, "h", (s % 3600) / 60, "m"),
        _ => compound(s / 86_400, "d", (s % 86_400) / 3600, "h"),
    }
}

fn compound(big: u64, big_unit: &str, small: u64, small_unit: &str) -> String {
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit}{small}{small_unit}")
    }
}

/// Bytes in binary units, e.g. `12.3 MiB`.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Whether `c` must not reach a terminal as it is: C0 and C1 controls and DEL (escape sequences,
/// bells, backspaces, carriage returns that overwrite a line), Unicode bidirectional overrides,
/// embeddings, isolates and marks (text displayed in another order than it reads), and the line
/// and paragraph separators.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// `s` made safe for a terminal: every unsafe character written out as `\u{1b}`, except line
/// breaks and tabs when `keep_lines` (a body's own layout). Text from a message (body, headers,
/// properties) goes through this, or [`escape_json`], before it is printed.
pub(crate) fn escape_text(s: &str, keep_lines: bool) -> Cow<'_, str> {
    let keep = |c: char| keep_lines && (c == '\n' || c == '\t');
    if !s.chars().any(|c| is_unsafe(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if is_unsafe(c) && !keep(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// JSON text made safe for a terminal, still the same JSON: serde_json escapes the C0 controls
/// inside strings but writes DEL, the C1 controls and the bidirectional controls as they are;
/// this writes those as `\uXXXX` escapes, which parse back to the same characters. (Outside
/// strings JSON has no such characters, and its whitespace is left alone.)
pub(crate) fn escape_json(json: &str) -> Cow<'_, str> {
    let escape = |c: char| is_unsafe(c) && !matches!(c, '\n' | '\t' | '\r' | ' ');
    if !json.chars().any(escape) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if escape(c) {
            // Every unsafe character is in the Basic Multilingual Plane: one escape each.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Cuts `s` to at most `max` characters, marking the cut, flattens line breaks so that one
/// record stays on one table row, and escapes every other unsafe character ([`escape_text`]).
pub(crate) fn clip(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| {
            if matches!(c, '\n' | '\r' | '\t') {
                ' '
            } else {
                c
            }
        })
        .collect();
    let flat = escape_text(&flat, false).into_owned();
    match flat.char_indices().nth(max.saturating_sub(1)) {
        Some((cut, _)) if flat.chars().count() > max => format!("{}…", &flat[..cut]),
        _ => flat,
    }
}

/// Renders rows under headers with columns padded to their widest cell. The last column is not
/// padded, so lines carry no trailing spaces.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        assert_eq!(human_age(Duration::from_secs(5)), "5s");
        assert_eq!(human_age(Duration::from_secs(125)), "2m");
        assert_eq!(human_age(Duration::from_secs(3600)), "1h");
        assert_eq!(human_age(Duration::from_secs(3600 + 20 * 60)), "1h20m");
        assert_eq!(human_age(Duration::from_secs(4 * 86_400 + 7200)), "4d2h");
    }

    #[test]
    fn bytes_are_binary() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn clips_and_flattens() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("0123456789abc", 10), "012345678…");
        assert_eq!(clip("a\nb", 10), "a b");
        assert_eq!(clip("ünïcödé!", 4), "ünï…");
        assert_eq!(clip("a\u{1b}[2Jb", 20), "a\\u{1b}[2Jb");
    }

    #[test]
    fn escapes_terminal_controls_and_keeps_json_json() {
        let hostile = "a\u{1b}]0;t\u{7}b\rc\u{7f}d\u{9b}e\u{202e}f\ng\th";
        assert_eq!(
            escape_text(hostile, false),
            "a\\u{1b}]0;t\\u{7}b\\u{d}c\\u{7f}d\\u{9b}e\\u{202e}f\\u{a}g\\u{9}h"
        );
        assert_eq!(
            escape_text(hostile, true),
            "a\\u{1b}]0;t\\u{7}b\\u{d}c\\u{7f}d\\u{9b}e\\u{202e}f\ng\th"
        );
        assert!(matches!(escape_text("plain ünï", false), Cow::Borrowed(_)));
        let json =
            serde_json::to_string_pretty(&serde_json::json!({ hostile: [hostile] })).unwrap();
        let safe = escape_json(&json);
        assert!(safe.chars().all(|c| !is_unsafe(c) || c == '\n'), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, serde_json::json!({ hostile: [hostile] }));
    }

    #[test]
    fn tables_align_without_trailing_spaces() {
        let t = table(
            &["ID", "KIND"],
            &[
                vec!["1".into(), "send-text".into()],
                vec!["22".into(), "x".into()],
            ],
        );
        assert_eq!(t, "ID  KIND\n1   send-text\n22  x\n");
    }
}
