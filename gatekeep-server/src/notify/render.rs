//! What a human reads about a request in a chat message, as plain strings that are safe to
//! show: every workload-controlled value (argv, paths, user names, cgroups) is quoted
//! when it holds anything but plain characters, with control and invisible characters
//! escaped, so a crafted argument can neither fake a line nor hide what runs. Each sink
//! adds its own escaping for its markup (Slack mrkdwn, Teams markdown) on top.

use gatekeep_proto::model::{RequestRecord, RequestState, Target};
use time::OffsetDateTime;

/// Longest rendered command line or destination; longer ones are cut with a note (the
/// console shows the whole request).
const MAX_SHOWN: usize = 1500;

/// A word as a reader should see it: as is when made of plain characters, else quoted
/// with Rust's escapes (`"a b"`, `"\n"`, `"\u{202e}"`).
#[must_use]
pub fn word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("{text:?}")
    }
}

/// Cuts `text` to [`MAX_SHOWN`] characters at most, saying so.
fn bounded(text: String) -> String {
    if text.chars().count() <= MAX_SHOWN {
        return text;
    }
    let cut: String = text.chars().take(MAX_SHOWN).collect();
    format!("{cut} … (cut; the console shows all of it)")
}

/// "Command line" or "Destination", and the value.
#[must_use]
pub fn subject(record: &RequestRecord) -> (&'static str, String) {
    match &record.request.target {
        Target::Exec(exec) => {
            let mut line = word(&exec.executable);
            for arg in &exec.argv {
                line.push(' ');
                line.push_str(&word(arg));
            }
            if exec.argv_truncated {
                line.push_str(" [argv truncated by the kernel]");
            }
            ("Command line", bounded(line))
        }
        Target::Connect(connect) => {
            let mut line = format!(
                "{}:{} ({} {})",
                word(&connect.address),
                connect.port,
                connect.family.as_str(),
                connect.socket_type.as_str()
            );
            if !connect.resolved.is_empty() {
                let names: Vec<String> = connect.resolved.iter().map(|n| word(n)).collect();
                line.push_str(" = ");
                line.push_str(&names.join(", "));
            }
            ("Destination", bounded(line))
        }
    }
}

/// Who or what asked: user, process and workload.
#[must_use]
pub fn asker(record: &RequestRecord) -> String {
    let request = &record.request;
    let user = request.user_name.as_deref().map_or_else(
        || format!("uid {}", request.uid),
        |name| format!("{} (uid {})", word(name), request.uid),
    );
    let parent = request
        .ancestry
        .first()
        .map(|p| format!(", parent {} ({})", word(&p.comm), p.pid))
        .unwrap_or_default();
    bounded(format!(
        "{user}, pid {}{parent}, cgroup {}",
        request.pid,
        word(&request.cgroup)
    ))
}

/// "approved", "denied", ... as a title word.
#[must_use]
pub fn outcome(state: RequestState) -> &'static str {
    match state {
        RequestState::Pending => "Approval requested",
        RequestState::Approved => "Approved",
        RequestState::Denied => "Denied",
        RequestState::Expired => "Expired",
        RequestState::Cancelled => "Cancelled",
        RequestState::Abandoned => "Withdrawn by the agent",
    }
}

/// Time left until the deadline, to the second (`4m 59s`), or `none` once past.
#[must_use]
pub fn time_left(record: &RequestRecord, now: OffsetDateTime) -> String {
    let left = record.deadline - now;
    if left.is_negative() || left.is_zero() {
        return "none".to_owned();
    }
    let secs = u64::try_from(left.whole_seconds()).unwrap_or(0);
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// RFC 3339 (UTC), for fallbacks and card text.
#[must_use]
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// The console's page of a request.
#[must_use]
pub fn console_link(console_url: &str, record: &RequestRecord) -> String {
    format!(
        "{}/console/#/request/{}",
        console_url.trim_end_matches('/'),
        record.request.id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_that_could_mislead_are_quoted() {
        assert_eq!(word("/usr/bin/curl"), "/usr/bin/curl");
        assert_eq!(word("-d"), "-d");
        assert_eq!(word("a b"), "\"a b\"");
        assert_eq!(word("x\nApproved by alice"), "\"x\\nApproved by alice\"");
        assert_eq!(word("evil\u{202e}gnp.exe"), "\"evil\\u{202e}gnp.exe\"");
        assert_eq!(word("<!channel>"), "\"<!channel>\"");
        assert_eq!(word(""), "\"\"");
        let long = bounded("x".repeat(MAX_SHOWN + 10));
        assert!(long.ends_with("(cut; the console shows all of it)"));
    }
}
