//! The one escaping function for text a workload controls (argv, cwd, comm, ancestry, cgroup
//! paths, socket paths...) on its way to a reviewer's terminal.
//!
//! A paused request's argv is written by the workload under review. Printed raw, an escape
//! sequence in it could move the cursor, rewrite the line the reviewer reads, retitle the
//! window or hide the real command behind a right-to-left override. [`terminal`] makes every
//! such character visible instead:
//!
//! - C0 controls and DEL (ESC, BEL, CR, LF, TAB, backspace...), which start or are the
//!   terminal's control functions (CSI is `ESC [`, OSC is `ESC ]`): `\e`, `\a`, `\r`, `\n`,
//!   `\t`, `\b`, others `\x07`;
//! - C1 controls (U+0080..U+009F, e.g. the one-character CSI U+009B): `\u{9b}`;
//! - bidirectional controls (U+202A..U+202E, U+2066..U+2069, U+200E, U+200F, U+061C) and
//!   invisible or line-breaking format characters (zero-width spaces and joiners, U+2028,
//!   U+2029, U+FEFF): `\u{202e}`;
//! - the backslash itself, as `\\`, so an escape can never be forged by the workload.
//!
//! Everything else, including printable non-ASCII (`é`, `日本`), is kept. The JSON output
//! (`--output json`) is not passed through here: JSON escapes control characters itself and
//! consumers want the raw values; `gatekeep api` prints its JSON through [`json`], which
//! also escapes what JSON leaves raw (DEL, C1, bidirectional controls).

use std::{borrow::Cow, fmt::Write as _};

/// Whether `c` must not reach a terminal as it is.
fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// `text` with every character a terminal would act on made visible (see the module docs).
#[must_use]
pub fn terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\u{1b}' => out.push_str("\\e"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if u32::from(c) < 0x80 && needs_escape(c) => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Serialized JSON made safe for a terminal and still the same JSON: `serde_json` escapes
/// only C0 controls in strings, so DEL, C1 controls, bidirectional and invisible format
/// characters become `\uXXXX` escapes here (all are in the basic plane). The layout's own
/// newlines are kept; inside strings a newline is already `\n`.
#[must_use]
pub fn json(serialized: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c != '\n' && c != '\\' && needs_escape(c);
    if !serialized.chars().any(unsafe_char) {
        return Cow::Borrowed(serialized);
    }
    let mut out = String::with_capacity(serialized.len() + 8);
    for c in serialized.chars() {
        if unsafe_char(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// One argument of a command line, escaped, and quoted when it is empty or holds a space
/// or a quote, so that the words a reviewer sees are the words the program gets:
/// `rm "-rf /"` is one argument, `rm -rf /` three.
#[must_use]
pub fn word(text: &str) -> Cow<'_, str> {
    let escaped = terminal(text);
    if !escaped.is_empty()
        && !escaped
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\'')
    {
        return escaped;
    }
    let mut out = String::with_capacity(escaped.len() + 2);
    out.push('"');
    for c in escaped.chars() {
        if c == '"' {
            out.push_str("\\\"");
        } else {
            out.push(c);
        }
    }
    out.push('"');
    Cow::Owned(out)
}

/// A command line, each argument through [`word`], separated by spaces.
#[must_use]
pub fn words<'a>(argv: impl IntoIterator<Item = &'a String>) -> String {
    argv.into_iter()
        .map(|arg| word(arg))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_stays_json_and_hides_nothing() {
        let value = serde_json::json!({"argv": ["a\u{1b}[2J", "b\u{9b}31m", "\u{202e}txt.exe", "l\u{7f}", "é\\"]});
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        let safe = json(&pretty);
        assert!(
            !safe
                .chars()
                .any(|c| c != '\n' && needs_escape(c) && c != '\\'),
            "{safe}"
        );
        assert!(
            safe.contains("\\u009b") && safe.contains("\\u202e") && safe.contains("\\u007f"),
            "{safe}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&safe).unwrap(),
            value
        );
    }

    #[test]
    fn plain_text_and_printable_unicode_pass_unchanged() {
        for text in [
            "/usr/bin/git",
            "push --force",
            "café",
            "日本語",
            "a-b_c.d/e:f@g",
        ] {
            assert!(matches!(terminal(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn c0_controls_are_made_visible() {
        assert_eq!(terminal("a\u{1b}b"), "a\\eb");
        assert_eq!(terminal("ring\u{07}"), "ring\\a");
        assert_eq!(terminal("x\u{08}y"), "x\\by");
        assert_eq!(terminal("l1\nl2\rl3\tl4"), "l1\\nl2\\rl3\\tl4");
        assert_eq!(terminal("\u{0}\u{1}\u{1f}\u{7f}"), "\\x00\\x01\\x1f\\x7f");
    }

    #[test]
    fn csi_and_osc_sequences_cannot_reach_the_terminal() {
        // Clear the screen and move home (CSI), then set the window title (OSC ... BEL).
        let csi = "\u{1b}[2J\u{1b}[H/usr/bin/true";
        assert_eq!(terminal(csi), "\\e[2J\\e[H/usr/bin/true");
        let osc = "\u{1b}]0;owned\u{07}";
        assert_eq!(terminal(osc), "\\e]0;owned\\a");
        // OSC 8 hyperlink terminated by ST (ESC \).
        let link = "\u{1b}]8;;http://x\u{1b}\\text";
        assert_eq!(terminal(link), "\\e]8;;http://x\\e\\\\text");
        for out in [terminal(csi), terminal(osc), terminal(link)] {
            assert!(!out.chars().any(char::is_control), "{out}");
        }
    }

    #[test]
    fn c1_controls_are_made_visible() {
        // U+009B is a one-character CSI on terminals that honour C1.
        assert_eq!(terminal("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(terminal("\u{85}\u{9d}"), "\\u{85}\\u{9d}");
    }

    #[test]
    fn bidi_overrides_and_invisible_characters_are_made_visible() {
        // "evil\u{202e}txt.sh" displays as "evilhs.txt" in a bidi-aware terminal.
        assert_eq!(terminal("evil\u{202e}txt.sh"), "evil\\u{202e}txt.sh");
        for c in [
            '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{2066}', '\u{2067}', '\u{2068}',
            '\u{2069}', '\u{200e}', '\u{200f}', '\u{061c}', '\u{200b}', '\u{200d}', '\u{2028}',
            '\u{2029}', '\u{feff}',
        ] {
            let out = terminal(&c.to_string()).into_owned();
            assert_eq!(out, format!("\\u{{{:x}}}", u32::from(c)));
        }
    }

    #[test]
    fn backslashes_are_doubled_so_escapes_cannot_be_forged() {
        // A workload writing the six characters `\e[2J` must not look like ESC [2J.
        assert_eq!(terminal("\\e[2J"), "\\\\e[2J");
        assert_ne!(terminal("\\e"), terminal("\u{1b}"));
    }

    #[test]
    fn words_are_quoted_when_spaces_would_hide_their_boundaries() {
        let argv: Vec<String> = ["rm", "-rf /", "", "it's", "a\"b", "\u{1b}[1m"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(words(&argv), r#"rm "-rf /" "" "it's" "a\"b" \e[1m"#);
    }
}
