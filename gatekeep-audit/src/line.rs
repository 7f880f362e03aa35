//! One record as a line of the JSON Lines export: written by `export`, read back by
//! `verify_export` (its own module so that neither imports the other).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One line of an export: every column, the payload as its stored canonical JSON text, in this
/// key order. Absent `request_id`/`actor` are `null`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ExportLine<'a> {
    pub(crate) seq: u64,
    #[serde(borrow)]
    pub(crate) at: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) kind: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) request_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) host: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) actor: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) payload: &'a RawValue,
    #[serde(borrow)]
    pub(crate) prev_hash: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) hash: Cow<'a, str>,
}
