//! Message content that is either a string or a list of parts, read by what the JSON
//! holds: an untagged enum would buffer the whole value and try each variant in turn.

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

/// Reads a string as `text(s)` and a list as `list(items)`.
pub fn text_or_list<'de, D, T, C>(
    d: D,
    text: fn(String) -> C,
    list: fn(Vec<T>) -> C,
) -> Result<C, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Either<T, C> {
        text: fn(String) -> C,
        list: fn(Vec<T>) -> C,
        items: PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>, C> Visitor<'de> for Either<T, C> {
        type Value = C;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or a list of content parts")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<C, E> {
            Ok((self.text)(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<C, E> {
            Ok((self.text)(v))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<C, A::Error> {
            Vec::<T>::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(self.list)
        }
    }
    d.deserialize_any(Either {
        text,
        list,
        items: PhantomData,
    })
}
