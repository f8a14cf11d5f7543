//! Room paths: the hierarchical addresses that key every record and every
//! Redis entry.
//!
//! A path is a list of hops, each a tag and a value. Its canonical text joins
//! tag/value pairs with `/` (`app/a1/room/r1`); a `/` or `\` inside a value is
//! escaped with a backslash, so parsing and printing round-trip for every
//! path. The canonical text is the Kafka record key, so all producers agree
//! on partitions.

use std::fmt;
use std::str::FromStr;

use crate::proto::omni as pb;

/// Longest canonical text accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// The kind of a hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tag {
    App,
    Channel,
    Group,
    Room,
    User,
    Session,
    Region,
}

impl Tag {
    pub const ALL: [Tag; 7] = [Tag::App, Tag::Channel, Tag::Group, Tag::Room, Tag::User, Tag::Session, Tag::Region];

    pub fn as_str(self) -> &'static str {
        match self {
            Tag::App => "app",
            Tag::Channel => "channel",
            Tag::Group => "group",
            Tag::Room => "room",
            Tag::User => "user",
            Tag::Session => "session",
            Tag::Region => "region",
        }
    }

    fn from_text(text: &str) -> Option<Tag> {
        Tag::ALL.into_iter().find(|t| t.as_str() == text)
    }

    fn to_proto(self) -> pb::Tag {
        match self {
            Tag::App => pb::Tag::App,
            Tag::Channel => pb::Tag::Channel,
            Tag::Group => pb::Tag::Group,
            Tag::Room => pb::Tag::Room,
            Tag::User => pb::Tag::User,
            Tag::Session => pb::Tag::Session,
            Tag::Region => pb::Tag::Region,
        }
    }

    fn from_proto(tag: pb::Tag) -> Option<Tag> {
        Some(match tag {
            pb::Tag::Unspecified => return None,
            pb::Tag::App => Tag::App,
            pb::Tag::Channel => Tag::Channel,
            pb::Tag::Group => Tag::Group,
            pb::Tag::Room => Tag::Room,
            pb::Tag::User => Tag::User,
            pb::Tag::Session => Tag::Session,
            pb::Tag::Region => Tag::Region,
        })
    }
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hop {
    pub tag: Tag,
    pub value: String,
}

/// A parsed, valid path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Path {
    hops: Vec<Hop>,
}

/// Why a text or message is not a valid path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path is {0} bytes, over the {MAX_PATH_BYTES}-byte limit")]
    TooLong(usize),
    #[error("unknown tag {0:?} (expected one of app, channel, group, room, user, session, region)")]
    UnknownTag(String),
    #[error("tag {0:?} has an empty value")]
    EmptyValue(String),
    #[error("tag {0:?} has no value (a path is tag/value pairs)")]
    MissingValue(String),
    #[error("dangling escape at the end of the path")]
    DanglingEscape,
    #[error("invalid escape \\{0} (only \\/ and \\\\ are allowed)")]
    InvalidEscape(char),
    #[error("not a room path: expected app/<id>/.../room/<id>, got {0:?}")]
    NotARoom(String),
}

impl Path {
    /// A path from hops; fails on an empty hop list, an empty value or an over-long text.
    pub fn new(hops: Vec<Hop>) -> Result<Path, PathError> {
        if hops.is_empty() {
            return Err(PathError::Empty);
        }
        if let Some(hop) = hops.iter().find(|h| h.value.is_empty()) {
            return Err(PathError::EmptyValue(hop.tag.as_str().to_owned()));
        }
        let path = Path { hops };
        let len = path.text_len();
        if len > MAX_PATH_BYTES {
            return Err(PathError::TooLong(len));
        }
        Ok(path)
    }

    /// The length of the canonical text, without building it.
    fn text_len(&self) -> usize {
        let separators = 2 * self.hops.len() - 1;
        let escaped = |v: &str| v.len() + v.bytes().filter(|b| *b == b'/' || *b == b'\\').count();
        separators + self.hops.iter().map(|h| h.tag.as_str().len() + escaped(&h.value)).sum::<usize>()
    }

    /// The canonical room path `app/<app_id>/room/<room_id>`.
    pub fn room(app_id: &str, room_id: &str) -> Result<Path, PathError> {
        Path::new(vec![
            Hop { tag: Tag::App, value: app_id.to_owned() },
            Hop { tag: Tag::Room, value: room_id.to_owned() },
        ])
    }

    pub fn hops(&self) -> &[Hop] {
        &self.hops
    }

    /// The value of the first hop with `tag`.
    pub fn value_of(&self, tag: Tag) -> Option<&str> {
        self.hops.iter().find(|h| h.tag == tag).map(|h| h.value.as_str())
    }

    /// True when the path names a room: it starts at an app and ends at a room.
    pub fn is_room(&self) -> bool {
        self.hops.first().map(|h| h.tag) == Some(Tag::App) && self.hops.last().map(|h| h.tag) == Some(Tag::Room)
    }

    /// Parses a record key as a room path.
    pub fn parse_room(text: &str) -> Result<Path, PathError> {
        let path: Path = text.parse()?;
        if path.is_room() {
            Ok(path)
        } else {
            Err(PathError::NotARoom(text.to_owned()))
        }
    }

    pub fn to_proto(&self) -> pb::Path {
        pb::Path {
            hops: self.hops.iter().map(|h| pb::Hop { tag: h.tag.to_proto() as i32, value: h.value.clone() }).collect(),
        }
    }

    pub fn from_proto(msg: &pb::Path) -> Result<Path, PathError> {
        let hops = msg
            .hops
            .iter()
            .map(|h| {
                let tag = pb::Tag::try_from(h.tag)
                    .ok()
                    .and_then(Tag::from_proto)
                    .ok_or_else(|| PathError::UnknownTag(h.tag.to_string()))?;
                Ok(Hop { tag, value: h.value.clone() })
            })
            .collect::<Result<Vec<_>, PathError>>()?;
        Path::new(hops)
    }
}

/// Splits canonical text into its unescaped `/`-separated tokens. Copies
/// whole runs between separators and escapes, so a token is one allocation.
pub(crate) fn tokens(text: &str) -> Result<Vec<String>, PathError> {
    let mut out = Vec::with_capacity(4);
    let mut token = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(['/', '\\']) {
        token.push_str(&rest[..at]);
        let separator = rest.as_bytes()[at];
        rest = &rest[at + 1..];
        if separator == b'/' {
            out.push(std::mem::take(&mut token));
            continue;
        }
        match rest.chars().next() {
            Some(escaped @ ('/' | '\\')) => {
                token.push(escaped);
                rest = &rest[1..];
            }
            Some(other) => return Err(PathError::InvalidEscape(other)),
            None => return Err(PathError::DanglingEscape),
        }
    }
    token.push_str(rest);
    out.push(token);
    Ok(out)
}

/// Writes a value with `/` and `\` escaped.
pub(crate) fn escape_into(value: &str, out: &mut impl fmt::Write) -> fmt::Result {
    for c in value.chars() {
        if c == '/' || c == '\\' {
            out.write_char('\\')?;
        }
        out.write_char(c)?;
    }
    Ok(())
}

impl FromStr for Path {
    type Err = PathError;

    fn from_str(text: &str) -> Result<Path, PathError> {
        if text.is_empty() {
            return Err(PathError::Empty);
        }
        if text.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(text.len()));
        }
        let tokens = tokens(text)?;
        let mut hops = Vec::with_capacity(tokens.len() / 2);
        let mut iter = tokens.into_iter();
        while let Some(tag_text) = iter.next() {
            let tag = Tag::from_text(&tag_text).ok_or_else(|| PathError::UnknownTag(tag_text.clone()))?;
            let value = iter.next().ok_or_else(|| PathError::MissingValue(tag_text.clone()))?;
            if value.is_empty() {
                return Err(PathError::EmptyValue(tag_text));
            }
            hops.push(Hop { tag, value });
        }
        Path::new(hops)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, hop) in self.hops.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            f.write_str(hop.tag.as_str())?;
            f.write_str("/")?;
            escape_into(&hop.value, f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn canonical_room_path_round_trips() {
        let path: Path = "app/a1/room/r1".parse().unwrap();
        assert_eq!(path, Path::room("a1", "r1").unwrap());
        assert_eq!(path.to_string(), "app/a1/room/r1");
        assert!(path.is_room());
        assert_eq!(path.value_of(Tag::Room), Some("r1"));
    }

    #[test]
    fn region_and_other_hops_are_allowed() {
        let text = "region/eu/app/a1/channel/c/group/g/room/r/user/u/session/s";
        let path: Path = text.parse().unwrap();
        assert_eq!(path.hops().len(), 7);
        assert_eq!(path.to_string(), text);
        assert!(!path.is_room());
    }

    #[test]
    fn invalid_paths_get_clear_errors() {
        assert_eq!("".parse::<Path>(), Err(PathError::Empty));
        assert_eq!("app//room/r".parse::<Path>(), Err(PathError::EmptyValue("app".into())));
        assert_eq!("planet/x".parse::<Path>(), Err(PathError::UnknownTag("planet".into())));
        assert_eq!("app/a1/room".parse::<Path>(), Err(PathError::MissingValue("room".into())));
        assert_eq!("app/a\\x".parse::<Path>(), Err(PathError::InvalidEscape('x')));
        assert_eq!("app/a\\".parse::<Path>(), Err(PathError::DanglingEscape));
        let long = format!("app/{}", "x".repeat(1100));
        assert_eq!(long.parse::<Path>(), Err(PathError::TooLong(long.len())));
        assert!(matches!(Path::parse_room("app/a1"), Err(PathError::NotARoom(_))));
        assert!(PathError::UnknownTag("planet".into()).to_string().contains("unknown tag"));
    }

    #[test]
    fn a_slash_inside_a_value_must_be_escaped() {
        let path = Path::room("a/b", "r\\1").unwrap();
        assert_eq!(path.to_string(), "app/a\\/b/room/r\\\\1");
        assert_eq!(path.to_string().parse::<Path>().unwrap(), path);
        // Unescaped, the same characters read as more hops.
        assert!("app/a/b/room/r".parse::<Path>().is_err());
    }

    #[test]
    fn the_length_limit_counts_the_canonical_text() {
        let path = Path::room("a/b", "r").unwrap();
        assert_eq!(path.text_len(), path.to_string().len());
        let at_limit = format!("app/{}", "x".repeat(MAX_PATH_BYTES - 4));
        assert!(at_limit.parse::<Path>().is_ok());
        assert!(Path::room(&"/".repeat(600), "r").is_err(), "escapes count towards the limit");
    }

    #[test]
    fn proto_form_round_trips() {
        let path: Path = "region/us/app/a1/room/r1".parse().unwrap();
        assert_eq!(Path::from_proto(&path.to_proto()).unwrap(), path);
        let bad = pb::Path { hops: vec![pb::Hop { tag: 0, value: "x".into() }] };
        assert!(Path::from_proto(&bad).is_err());
    }

    fn arb_path() -> impl Strategy<Value = Path> {
        let hop = (0usize..7, "[a-z0-9/\\\\._-]{1,12}").prop_map(|(t, value)| Hop { tag: Tag::ALL[t], value });
        prop::collection::vec(hop, 1..6).prop_map(|hops| Path::new(hops).unwrap())
    }

    proptest! {
        #[test]
        fn printing_then_parsing_is_identity(path in arb_path()) {
            prop_assert_eq!(path.to_string().parse::<Path>().unwrap(), path);
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,64}") {
            let _ = text.parse::<Path>();
        }
    }
}
