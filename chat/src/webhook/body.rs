//! A delivery's JSON read in one pass, borrowing its strings from the body.
//!
//! Only the fields an event has are kept, and only as much of each as the rules need:
//! whether it is a string (and which), an object, or something else. Everything else is
//! skipped without being built. A field given twice counts as its last value, as in
//! `serde_json::Value`.

use std::{borrow::Cow, fmt};

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A JSON value: a string (borrowed unless it has escapes), or anything else.
pub(crate) enum Loose<'a> {
    /// A string.
    Str(Cow<'a, str>),
    /// A number, boolean, null, array or object.
    Other,
}

/// A JSON value that is an object with the fields of `T`, or anything else.
pub(crate) enum Shaped<T> {
    /// An object.
    Object(T),
    /// Not an object.
    Other,
}

/// The top level of a delivery.
#[derive(Default)]
pub(crate) struct Envelope<'a> {
    /// `type`.
    pub(crate) kind: Option<Loose<'a>>,
    /// `timestamp`.
    pub(crate) timestamp: Option<Loose<'a>>,
    /// `data`.
    pub(crate) data: Option<Shaped<Data<'a>>>,
}

/// `data`.
#[derive(Default)]
pub(crate) struct Data<'a> {
    /// `data.id`.
    pub(crate) id: Option<Loose<'a>>,
    /// `data.direction`.
    pub(crate) direction: Option<Loose<'a>>,
    /// `data.content`.
    pub(crate) content: Option<Loose<'a>>,
    /// `data.conversation_id`.
    pub(crate) conversation_id: Option<Loose<'a>>,
}

/// An object's fields, read from its entries.
trait Fields<'de>: Default {
    /// Reads the value of the entry named `key` if it is one of ours, else skips it.
    fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error>;
}

impl<'de> Fields<'de> for Envelope<'de> {
    fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "type" => self.kind = Some(map.next_value()?),
            "timestamp" => self.timestamp = Some(map.next_value()?),
            "data" => self.data = Some(map.next_value()?),
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl<'de> Fields<'de> for Data<'de> {
    fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        let slot = match key {
            "id" => &mut self.id,
            "direction" => &mut self.direction,
            "content" => &mut self.content,
            "conversation_id" => &mut self.conversation_id,
            _ => {
                map.next_value::<IgnoredAny>()?;
                return Ok(());
            }
        };
        *slot = Some(map.next_value()?);
        Ok(())
    }
}

/// Skips the rest of an array.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Skips the rest of an object.
fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// The visitor methods of every value that is neither a string nor an object, each
/// answering `$other`.
macro_rules! visit_others {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            skip_seq(seq)?;
            Ok($other)
        }
    };
}

impl<'de> Deserialize<'de> for Loose<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Loose<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Owned(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map)?;
                Ok(Loose::Other)
            }
            visit_others!(Loose::Other);
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de, T: Fields<'de>> Deserialize<'de> for Shaped<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Fields<'de>> Visitor<'de> for V<T> {
            type Value = Shaped<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Shaped::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = T::default();
                while let Some(key) = map.next_key::<Loose<'de>>()? {
                    match key {
                        Loose::Str(key) => fields.field(&key, &mut map)?,
                        Loose::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Shaped::Object(fields))
            }
            visit_others!(Shaped::Other);
        }
        deserializer.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Reads a delivery's body: `Err` when it is not JSON.
pub(crate) fn read(body: &[u8]) -> serde_json::Result<Shaped<Envelope<'_>>> {
    serde_json::from_slice(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn str_of<'a>(v: &'a Option<Loose<'a>>) -> Option<&'a str> {
        match v {
            Some(Loose::Str(s)) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn reads_the_fields_it_knows_and_skips_the_rest() {
        let body = br#"{"extra": [1, {"a": null}], "type": "NEW_MESSAGE", "timestamp": "2026-01-01T10:00:00",
                        "data": {"id": "x", "content": "caf\u00e9", "direction": 3, "more": {"k": [true]}}}"#;
        let Shaped::Object(e) = read(body).unwrap() else {
            panic!("an object")
        };
        assert_eq!(str_of(&e.kind), Some("NEW_MESSAGE"));
        assert_eq!(str_of(&e.timestamp), Some("2026-01-01T10:00:00"));
        let Some(Shaped::Object(d)) = &e.data else {
            panic!("data is an object")
        };
        assert_eq!(str_of(&d.id), Some("x"));
        assert_eq!(str_of(&d.content), Some("café"));
        assert!(matches!(d.direction, Some(Loose::Other)));
        assert!(d.conversation_id.is_none());
    }

    #[test]
    fn a_field_given_twice_counts_as_its_last_value() {
        let Shaped::Object(e) =
            read(br#"{"type": 1, "type": "B", "data": {}, "data": 2}"#).unwrap()
        else {
            panic!("an object")
        };
        assert_eq!(str_of(&e.kind), Some("B"));
        assert!(matches!(e.data, Some(Shaped::Other)));
    }

    #[test]
    fn anything_but_an_object_is_other_and_bad_json_is_an_error() {
        for body in [&b"[1, 2]"[..], b"\"text\"", b"12", b"null", b"true"] {
            assert!(matches!(read(body), Ok(Shaped::Other)), "{body:?}");
        }
        for body in [&b"{"[..], b"", b"{\"type\": }", b"{} trailing", b"\xff"] {
            assert!(read(body).is_err(), "{body:?}");
        }
    }
}
