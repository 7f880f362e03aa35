//! `gatekeep notify ...`: the notifications the service gave up on (its dead-letter
//! record) and delivering them again, through the HTTP API (administrators only: members
//! of the service's `[console] admin_groups`).

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde::Deserialize;
use serde_json::Value;

use crate::{
    api::{self, ApiMethod},
    config::Connection,
    escape,
    output::table,
};

#[derive(Debug, Subcommand)]
pub enum NotifyCommand {
    /// List the notifications given up on (retries exhausted, or refused by the receiver),
    /// oldest first.
    DeadLetters {
        /// Print JSON (as `--output json`).
        #[arg(long)]
        json: bool,
    },
    /// Deliver a dead letter again: it leaves the record, and a replica running its sink
    /// delivers it within seconds (a new dead letter if it fails again).
    Retry {
        /// The dead letter's id (first column of `gatekeep notify dead-letters`).
        id: i64,
    },
}

#[derive(Debug, Deserialize)]
struct DeadLetter {
    id: i64,
    sink: String,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    key: String,
    error: String,
    attempts: u32,
    at: String,
}

#[derive(Debug, Deserialize)]
struct DeadLetters {
    dead_letters: Vec<DeadLetter>,
}

/// Runs `command`; `json` from `--output json`.
pub async fn run(
    connection: &Connection,
    command: &NotifyCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        NotifyCommand::DeadLetters { json: as_json } => {
            let answer = api::call(
                connection,
                ApiMethod::Get,
                "/api/v1/notify/dead-letters",
                None,
                false,
            )
            .await?;
            if json || *as_json {
                print_json(&answer)
            } else {
                let list: DeadLetters = serde_json::from_value(answer)
                    .context("the service's dead-letter list is not what this CLI reads")?;
                print!("{}", render(&list.dead_letters));
                Ok(())
            }
        }
        NotifyCommand::Retry { id } => {
            if *id <= 0 {
                bail!("`{id}` is not a dead letter id; see `gatekeep notify dead-letters`");
            }
            let answer = api::call(
                connection,
                ApiMethod::Post,
                &format!("/api/v1/notify/dead-letters/{id}/retry"),
                None,
                false,
            )
            .await?;
            if json {
                return print_json(&answer);
            }
            let letter: DeadLetter = serde_json::from_value(answer)
                .context("the service's answer is not a dead letter")?;
            println!(
                "dead letter {} ({} {}) queued: a replica running `{}` delivers it within seconds",
                letter.id,
                escape::terminal(&letter.sink),
                escape::terminal(&letter.key),
                escape::terminal(&letter.sink),
            );
            Ok(())
        }
    }
}

fn print_json(answer: &Value) -> anyhow::Result<()> {
    // Receivers' error texts are not ours: nothing in them reaches the terminal raw.
    println!("{}", escape::json(&serde_json::to_string_pretty(answer)?));
    Ok(())
}

/// The record as a table (every field escaped for the terminal).
fn render(letters: &[DeadLetter]) -> String {
    if letters.is_empty() {
        return "no dead letters: every notification was delivered or is still being tried\n"
            .to_owned();
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|letter| {
            let t = |text: &str| escape::terminal(text).into_owned();
            vec![
                letter.id.to_string(),
                t(&letter.at),
                t(&letter.sink),
                letter.subject.as_deref().map_or_else(|| t(&letter.key), t),
                t(letter.event.as_deref().unwrap_or("-")),
                t(letter.channel.as_deref().unwrap_or("-")),
                letter.attempts.to_string(),
                t(&letter.error),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "AT",
            "SINK",
            "ABOUT",
            "EVENT",
            "CHANNEL",
            "ATTEMPTS",
            "LAST ERROR",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_a_table_with_escaped_errors() {
        let letters = vec![DeadLetter {
            id: 7,
            sink: "webhook:siem".into(),
            subject: Some("6f1c1d2e-3a4b-4c5d-8e9f-001122334455".into()),
            event: Some("decided".into()),
            channel: Some("webhook:siem".into()),
            key: "6f1c1d2e-3a4b-4c5d-8e9f-001122334455 decided webhook:siem".into(),
            error: "webhook:siem: http status 400 \u{1b}[31mBad".into(),
            attempts: 1,
            at: "2026-12-04T15:51:09Z".into(),
        }];
        let text = render(&letters);
        assert!(text.starts_with("ID  AT"), "{text}");
        assert!(
            text.contains("7   2026-12-04T15:51:09Z  webhook:siem"),
            "{text}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "no escape sequence reaches the terminal: {text}"
        );
        assert!(render(&[]).starts_with("no dead letters"));
    }
}
