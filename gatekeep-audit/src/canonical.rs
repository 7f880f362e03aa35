//! Canonical JSON straight from any [`Serialize`] value, without building a
//! [`serde_json::Value`] tree first.
//!
//! The text is exactly what [`canonical_json`](crate::canonical_json) writes for
//! `serde_json::to_value(value)`: object keys sorted by their UTF-8 bytes at every depth
//! (the last of equal keys wins, as in a map), no whitespace, strings and numbers as
//! `serde_json` writes them, `f32` widened to `f64` first. Building and dropping the tree
//! was a tenth of the service's work per decision.

use std::borrow::Cow;

use serde::{
    Serialize,
    ser::{self, Impossible},
};
use serde_json::Error;

use crate::error::AuditError;

/// `value` as canonical JSON.
pub fn to_canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<String, AuditError> {
    let mut state = State {
        out: Vec::with_capacity(1024),
        spans: Vec::new(),
        scratch: Vec::new(),
    };
    value
        .serialize(Canonical { st: &mut state })
        .map_err(|source| AuditError::EncodePayload { source })?;
    // Only UTF-8 is ever written: `serde_json`'s leaves and keys, and ASCII punctuation.
    String::from_utf8(state.out).map_err(|err| AuditError::EncodePayload {
        source: ser::Error::custom(err),
    })
}

/// The buffers of one encoding, shared by every nested object so that none allocates its
/// own (on a busy host, touching fresh memory cost more than the writing).
struct State {
    /// The text so far; an open object's values sit at its end, unsorted and without keys.
    out: Vec<u8>,
    /// Every open object's entries: key, and where its value's text is in `out`.
    spans: Vec<(Cow<'static, str>, usize, usize)>,
    /// Where a closing object is assembled in order.
    scratch: Vec<u8>,
}

/// Writes one value; objects go through [`Object`], which sorts them.
struct Canonical<'a> {
    st: &'a mut State,
}

impl Canonical<'_> {
    /// A leaf, as `serde_json` writes it.
    fn leaf<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        serde_json::to_writer(&mut self.st.out, value)
    }

    /// `{"variant":` ... — the caller writes the value and the closing brace.
    fn open_variant(&mut self, variant: &str) -> Result<(), Error> {
        self.st.out.push(b'{');
        serde_json::to_writer(&mut self.st.out, variant)?;
        self.st.out.push(b':');
        Ok(())
    }
}

impl<'a> ser::Serializer for Canonical<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Array<'a>;
    type SerializeTuple = Array<'a>;
    type SerializeTupleStruct = Array<'a>;
    type SerializeTupleVariant = Array<'a>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Object<'a>;
    type SerializeStructVariant = Object<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_i128(self, v: i128) -> Result<(), Error> {
        // A `Value` holds only what fits 64 bits; so does this.
        let v = i64::try_from(v).map_err(|_| ser::Error::custom("number out of range"))?;
        self.leaf(&v)
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_u128(self, v: u128) -> Result<(), Error> {
        let v = u64::try_from(v).map_err(|_| ser::Error::custom("number out of range"))?;
        self.leaf(&v)
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        // `to_value` widens first, and the widened value prints differently (0.1f32 is
        // 0.10000000149011612).
        self.leaf(&f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.leaf(&v)
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        self.leaf(v)
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        self.leaf(v)
    }
    fn serialize_none(self) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.st.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        self.leaf(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        mut self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.open_variant(variant)?;
        value.serialize(Canonical { st: &mut *self.st })?;
        self.st.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Array<'a>, Error> {
        self.st.out.push(b'[');
        Ok(Array {
            st: self.st,
            first: true,
            variant: false,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<Array<'a>, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Array<'a>, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        mut self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Array<'a>, Error> {
        self.open_variant(variant)?;
        self.st.out.push(b'[');
        Ok(Array {
            st: self.st,
            first: true,
            variant: true,
        })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Object<'a>, Error> {
        Ok(Object::new(self.st, false))
    }
    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Object<'a>, Error> {
        if name == RAW_VALUE {
            // Its text is whatever it was given, not canonical.
            return Err(ser::Error::custom(
                "a RawValue cannot be written canonically",
            ));
        }
        Ok(Object::new(self.st, false))
    }
    fn serialize_struct_variant(
        mut self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Object<'a>, Error> {
        self.open_variant(variant)?;
        Ok(Object::new(self.st, true))
    }
}

/// The struct name `serde_json` gives a `RawValue`.
const RAW_VALUE: &str = "$serde_json::private::RawValue";

/// An array being written.
struct Array<'a> {
    st: &'a mut State,
    first: bool,
    /// Inside `{"variant":`: one more brace to close.
    variant: bool,
}

impl Array<'_> {
    fn item<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        if !self.first {
            self.st.out.push(b',');
        }
        self.first = false;
        value.serialize(Canonical { st: &mut *self.st })
    }

    fn close(self) {
        self.st.out.push(b']');
        if self.variant {
            self.st.out.push(b'}');
        }
    }
}

/// The four array-like compound serializers differ only in their method's name.
macro_rules! array_serializer {
    ($($trait:ident :: $method:ident),+) => {$(
        impl ser::$trait for Array<'_> {
            type Ok = ();
            type Error = Error;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
                self.item(value)
            }
            fn end(self) -> Result<(), Error> {
                self.close();
                Ok(())
            }
        }
    )+};
}

array_serializer!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// An object being written: each value's text goes to the end of `out` as it comes (its
/// span recorded in `spans`), and closing the object rewrites that stretch of `out` with the
/// entries sorted by key, keys included.
struct Object<'a> {
    st: &'a mut State,
    /// Where this object's text starts in `out`.
    start: usize,
    /// Where this object's entries start in `spans`.
    first_span: usize,
    /// The key given by `serialize_key`, waiting for its value.
    key: Option<String>,
    /// Inside `{"variant":`: one more brace to close.
    variant: bool,
}

impl<'a> Object<'a> {
    fn new(st: &'a mut State, variant: bool) -> Self {
        Self {
            start: st.out.len(),
            first_span: st.spans.len(),
            st,
            key: None,
            variant,
        }
    }

    fn entry<T: Serialize + ?Sized>(
        &mut self,
        key: Cow<'static, str>,
        value: &T,
    ) -> Result<(), Error> {
        let start = self.st.out.len();
        value.serialize(Canonical { st: &mut *self.st })?;
        let end = self.st.out.len();
        self.st.spans.push((key, start, end));
        Ok(())
    }

    fn close(self) -> Result<(), Error> {
        let State {
            out,
            spans,
            scratch,
        } = self.st;
        let entries = &mut spans[self.first_span..];
        // Equal keys stay in the order written, so that the last of them ends its run.
        entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.cmp(&b.1)));
        scratch.clear();
        scratch.push(b'{');
        let mut first = true;
        for (i, (key, start, end)) in entries.iter().enumerate() {
            if entries.get(i + 1).is_some_and(|next| next.0 == *key) {
                continue;
            }
            if !first {
                scratch.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut *scratch, key.as_ref())?;
            scratch.push(b':');
            scratch.extend_from_slice(&out[*start..*end]);
        }
        scratch.push(b'}');
        if self.variant {
            scratch.push(b'}');
        }
        spans.truncate(self.first_span);
        out.truncate(self.start);
        out.extend_from_slice(scratch);
        Ok(())
    }
}

impl ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        self.key = Some(key.serialize(KeyText)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let key = self
            .key
            .take()
            .ok_or_else(|| ser::Error::custom("a map value without its key"))?;
        self.entry(Cow::Owned(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.close()
    }
}

/// A struct and a struct variant's fields are written alike.
macro_rules! struct_serializer {
    ($($trait:ident),+) => {$(
        impl ser::$trait for Object<'_> {
            type Ok = ();
            type Error = Error;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), Error> {
                self.entry(Cow::Borrowed(key), value)
            }
            fn end(self) -> Result<(), Error> {
                self.close()
            }
        }
    )+};
}

struct_serializer!(SerializeStruct, SerializeStructVariant);

/// A map key as the text `serde_json` makes of it: strings as they are, integers and
/// booleans in decimal, unit variants by name; anything else is refused, as there.
struct KeyText;

fn key_must_be_a_string() -> Error {
    ser::Error::custom("key must be a string")
}

impl ser::Serializer for KeyText {
    type Ok = String;
    type Error = Error;
    type SerializeSeq = Impossible<String, Error>;
    type SerializeTuple = Impossible<String, Error>;
    type SerializeTupleStruct = Impossible<String, Error>;
    type SerializeTupleVariant = Impossible<String, Error>;
    type SerializeMap = Impossible<String, Error>;
    type SerializeStruct = Impossible<String, Error>;
    type SerializeStructVariant = Impossible<String, Error>;

    fn serialize_bool(self, v: bool) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_i8(self, v: i8) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_i16(self, v: i16) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_i32(self, v: i32) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_i64(self, v: i64) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_i128(self, v: i128) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_u8(self, v: u8) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_u16(self, v: u16) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_u32(self, v: u32) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_u64(self, v: u64) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_u128(self, v: u128) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_f32(self, _v: f32) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_f64(self, _v: f64) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_char(self, v: char) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_str(self, v: &str) -> Result<String, Error> {
        Ok(v.to_owned())
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_none(self) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit(self) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<String, Error> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<String, Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        Err(key_must_be_a_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde_json::{Value, json};

    use super::*;
    use crate::canonical_json;

    /// What the tree path writes for `value`.
    fn through_value<T: Serialize>(value: &T) -> String {
        canonical_json(&serde_json::to_value(value).unwrap()).unwrap()
    }

    #[derive(Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Shape {
        Unit,
        Newtype(u8),
        Tuple(i32, &'static str),
        Struct { zeta: bool, alpha: Option<u8> },
    }

    #[derive(Serialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum Tagged {
        Exec { argv: Vec<String>, path: String },
    }

    #[derive(Serialize)]
    struct Inner {
        b: f32,
        a: f64,
    }

    #[derive(Serialize)]
    struct Outer {
        zulu: Vec<Shape>,
        #[serde(flatten)]
        inner: Inner,
        #[serde(skip_serializing_if = "Option::is_none")]
        skipped: Option<u8>,
        tagged: Tagged,
        by_number: BTreeMap<u32, &'static str>,
        by_name: HashMap<String, i64>,
        tuple: (u8, char, ()),
        bytes: &'static [u8],
        text: &'static str,
        big: u64,
        small: i64,
        nan: f64,
    }

    fn outer() -> Outer {
        Outer {
            zulu: vec![
                Shape::Unit,
                Shape::Newtype(7),
                Shape::Tuple(-1, "t"),
                Shape::Struct {
                    zeta: true,
                    alpha: None,
                },
            ],
            inner: Inner { b: 0.1, a: 1e300 },
            skipped: None,
            tagged: Tagged::Exec {
                argv: vec!["curl".into(), "ex\u{e9}mple\n\"q\"".into()],
                path: "/usr/bin/curl".into(),
            },
            by_number: BTreeMap::from([(10, "ten"), (9, "nine")]),
            by_name: HashMap::from([("\u{e9}".into(), 1), ("Z".into(), 2), ("e".into(), 3)]),
            tuple: (1, 'x', ()),
            bytes: b"\x00\xff",
            text: "\u{1}\u{2028}/\\",
            big: u64::MAX,
            small: i64::MIN,
            nan: f64::NAN,
        }
    }

    #[test]
    fn writes_what_the_value_tree_writes() {
        let direct = to_canonical_json(&outer()).unwrap();
        assert_eq!(direct, through_value(&outer()));
        // Spot checks that the comparison is not vacuous: sorted at depth, f32 widened,
        // integer keys as text.
        assert!(direct.starts_with(r#"{"a":1e+300,"b":0.10000000149011612,"big":"#));
        assert!(direct.contains(r#""by_number":{"10":"ten","9":"nine"}"#));
        assert!(direct.contains(r#"{"struct":{"alpha":null,"zeta":true}}"#));
        assert!(direct.contains(r#""nan":null"#));
    }

    #[test]
    fn a_value_tree_itself_comes_out_as_canonical_json_writes_it() {
        let value = json!({
            "zeta": [3, {"b": 1, "a": "x\ny\"z"}],
            "alpha": null,
            "mid": {"é": 1.5, "e": -7, "Z": true},
        });
        assert_eq!(
            to_canonical_json(&value).unwrap(),
            canonical_json(&value).unwrap()
        );
    }

    #[test]
    fn of_equal_keys_the_last_wins_as_in_a_map() {
        struct Twice;
        impl Serialize for Twice {
            fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use ser::SerializeMap as _;
                let mut map = s.serialize_map(None)?;
                map.serialize_entry("k", &1)?;
                map.serialize_entry("a", &0)?;
                map.serialize_entry("k", &2)?;
                map.end()
            }
        }
        assert_eq!(to_canonical_json(&Twice).unwrap(), r#"{"a":0,"k":2}"#);
        assert_eq!(through_value(&Twice), r#"{"a":0,"k":2}"#);
    }

    #[test]
    fn keys_that_are_not_text_are_refused() {
        let map = BTreeMap::from([(vec![1], 1)]);
        assert!(matches!(
            to_canonical_json(&map),
            Err(AuditError::EncodePayload { .. })
        ));
        let raw = serde_json::value::RawValue::from_string("{ \"b\":1 }".into()).unwrap();
        assert!(to_canonical_json(&raw).is_err());
        assert!(to_canonical_json(&Value::Null).is_ok());
    }
}
