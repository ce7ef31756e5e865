//! Logging setup: human-readable by default, JSON with `--log-format json`; levels from
//! `RUST_LOG` (default `info`).
//!
//! Log lines carry values taken from messages (order ids, reasons quoting input), so no
//! value may be able to forge a line or a terminal sequence. The text format writes every
//! field and message through [`EscapeControl`]: a newline, an ANSI escape or a NUL in an
//! order id comes out as `\n`, `\u{1b}`, `\0`, at one place, whatever the call site does.
//! The JSON format needs nothing more: serde escapes control characters in every string
//! (a line is one JSON object; what looks odd in a string stays data for its reader).
//! Colours are used only when the output is a terminal.

use crate::config::LogFormat;
use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use tracing::field::Field;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{self, FormatFields, Writer};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, writing to stdout. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stdout().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(ansi)
        .with_target(true);
    match format {
        LogFormat::Text => builder.fmt_fields(escaping_fields()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A text subscriber like [`init`]'s, writing to `writer` (for tests of the format).
pub fn text_subscriber<W>(writer: W, ansi: bool) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(true)
        .fmt_fields(escaping_fields())
        .finish()
}

/// The text format's fields: the message first as it is, then `name=value` separated by
/// spaces (as tracing-subscriber's default), every value escaped by [`EscapeControl`].
/// Values recorded with `?` are already `Debug`-quoted; `%` and plain messages are not,
/// and this is where they are made safe.
pub fn escaping_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    format::debug_fn(
        |w: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug| {
            let name = field.name();
            if name != "message" {
                // `r#type` and the like: the raw-identifier prefix is not part of the name.
                write!(w, "{}=", name.strip_prefix("r#").unwrap_or(name))?;
            }
            write!(EscapeControl(w), "{value:?}")
        },
    )
    .delimited(" ")
}

/// A `fmt::Write` adapter that writes control characters (C0, DEL, C1) and the Unicode
/// line and paragraph separators and bidirectional overrides as Rust escapes (`\n`, `\r`,
/// `\t`, `\0`, `\u{1b}`, `\u{202e}`), so that no value can start a line, move the
/// cursor, colour a terminal, cut a line for grep, or reorder what a reader sees.
pub struct EscapeControl<W>(pub W);

impl<W: fmt::Write> fmt::Write for EscapeControl<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(needs_escape) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                '\0' => self.0.write_str("\\0")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// Characters a log line must not carry raw.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// The escaped form of `s` (see [`EscapeControl`]).
pub fn escape_control(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // Writing to a String cannot fail.
    let _ = EscapeControl(&mut out).write_str(s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buf {
        type Writer = Buf;
        fn make_writer(&'w self) -> Buf {
            self.clone()
        }
    }

    impl Buf {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().map(|b| b.clone()).unwrap_or_default()
        }
    }

    const EVIL: &str = "A-1\nERROR forged line\u{1b}[31m red\0nul\u{202e}";

    fn log_everything() {
        let reason = format!("bad order {EVIL}");
        let span = tracing::info_span!("batch", id = %EVIL);
        let _g = span.enter();
        tracing::warn!(order_id = %EVIL, debug = ?EVIL, plain = EVIL, %reason, "dead-lettering {EVIL}");
    }

    fn assert_clean(out: &[u8]) {
        let text = String::from_utf8_lossy(out);
        assert!(!out.contains(&0x1b), "raw ESC: {text}");
        assert!(!out.contains(&0), "raw NUL: {text}");
        assert_eq!(text.lines().count(), 1, "one line: {text}");
    }

    #[test]
    fn text_logs_escape_every_value_and_the_message() {
        let buf = Buf::default();
        tracing::subscriber::with_default(text_subscriber(buf.clone(), false), log_everything);
        let out = buf.bytes();
        assert_clean(&out);
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains('\u{202e}'), "raw bidi override: {text}");
        assert!(
            text.contains(r"order_id=A-1\nERROR forged line\u{1b}[31m red\0nul\u{202e}"),
            "{text}"
        );
        assert!(text.contains(r"dead-lettering A-1\nERROR"), "{text}");
        assert!(text.contains(r#"plain="A-1\nERROR"#), "{text}");
        assert!(text.contains(r"batch{id=A-1\nERROR"), "{text}");
    }

    #[test]
    fn colours_only_when_asked() {
        let buf = Buf::default();
        tracing::subscriber::with_default(text_subscriber(buf.clone(), true), log_everything);
        let coloured = buf.bytes();
        assert!(coloured.contains(&0x1b), "colours on a terminal");
        // The only escapes are the formatter's own: the value's is escaped.
        assert!(String::from_utf8_lossy(&coloured).contains(r"\u{1b}[31m"));
    }

    #[test]
    fn json_logs_are_escaped_by_serde() {
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .finish();
        tracing::subscriber::with_default(sub, log_everything);
        let out = buf.bytes();
        // Control characters are escaped (JSON requires it); a bidi override is valid JSON
        // text and stays: JSON logs are read by programs, which see it as data.
        assert_clean(&out);
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON object");
        assert_eq!(line["order_id"], EVIL);
        assert_eq!(line["message"], format!("dead-lettering {EVIL}"));
    }

    #[test]
    fn escapes() {
        assert_eq!(
            escape_control("a\r\n\t\0\u{7f}\u{85}b"),
            r"a\r\n\t\0\u{7f}\u{85}b"
        );
        assert_eq!(escape_control("ünïcödé 中文 ok"), "ünïcödé 中文 ok");
        assert_eq!(escape_control("\u{2028}\u{2066}"), r"\u{2028}\u{2066}");
    }
}
