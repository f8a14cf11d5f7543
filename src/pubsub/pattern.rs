//! Subject patterns: which paths a subscriber wants.
//!
//! A subject is a room path's canonical text, so a pattern is written in the
//! same syntax (tokens separated by `/`, with `\/` and `\\` escapes) plus the
//! two NATS wildcards: a `*` token matches exactly one token, and a final `>`
//! matches one or more remaining tokens. Matching works on unescaped tokens,
//! so `app/a\/b/>` matches only the app whose id is `a/b`.

use std::fmt;
use std::str::FromStr;

use crate::path::{escape_into, tokens, Path, Tag, MAX_PATH_BYTES};

use super::PubSubError;

/// One token of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Token {
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more tokens, always last.
    Rest,
}

/// A subject pattern such as `app/*/room/r9` or `app/a1/>`.
///
/// Patterns name tag/value pairs like paths do: a literal token in a tag
/// position must be a known tag, and a pattern without a final `>` must have
/// an even number of tokens. Both rules reject patterns that could never
/// match any path, which would otherwise fail silently.
///
/// ```
/// use omni::pubsub::Pattern;
///
/// let pattern = Pattern::parse("app/*/room/r9").unwrap();
/// assert!(pattern.matches("app/x/room/r9"));
/// assert!(!pattern.matches("app/x/room/r1"));
/// assert!(!pattern.matches("app/x/room/r9/user/u"));
///
/// let everything_in_app = Pattern::parse("app/a1/>").unwrap();
/// assert!(everything_in_app.matches("app/a1/room/r1/user/u"));
/// assert!(!everything_in_app.matches("app/a2/room/r1"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    tokens: Vec<Token>,
}

impl Pattern {
    /// Parses pattern text.
    ///
    /// Fails on empty text or tokens, a `>` that is not last, a `*` or `>`
    /// inside a longer token (wildcards are whole tokens only, so `r*` is an
    /// error rather than a literal that silently never matches), an invalid
    /// escape, an unknown tag, a missing value, or text over
    /// [`MAX_PATH_BYTES`] (a wildcard never matches fewer bytes than it
    /// takes, so such a pattern could match nothing).
    ///
    /// ```
    /// use omni::pubsub::Pattern;
    ///
    /// assert!(Pattern::parse("app/>").is_ok());
    /// assert!(Pattern::parse("app/>/room/r").is_err());
    /// assert!(Pattern::parse("app/r*").is_err());
    /// assert!(Pattern::parse("planet/*").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Pattern, PubSubError> {
        let invalid = |reason: String| PubSubError::InvalidPattern { pattern: text.to_owned(), reason };
        if text.is_empty() {
            return Err(invalid("pattern is empty".into()));
        }
        if text.len() > MAX_PATH_BYTES {
            return Err(invalid(format!("over the {MAX_PATH_BYTES}-byte limit of a path")));
        }
        let raw = tokens(text).map_err(|e| invalid(e.to_string()))?;
        let last = raw.len().saturating_sub(1);
        let mut out = Vec::with_capacity(raw.len());
        for (i, token) in raw.into_iter().enumerate() {
            let token = match token.as_str() {
                "" => return Err(invalid(format!("token {} is empty", i + 1))),
                "*" => Token::One,
                ">" if i == last => Token::Rest,
                ">" => return Err(invalid("`>` is only allowed as the last token".into())),
                t if t.contains(['*', '>']) => {
                    return Err(invalid(format!("`*` and `>` are wildcards only as whole tokens, not in {t:?}")))
                }
                _ if i % 2 == 0 && !Tag::ALL.iter().any(|tag| tag.as_str() == token) => {
                    return Err(invalid(format!(
                        "unknown tag {token:?} (expected one of app, channel, group, room, user, session, region)"
                    )))
                }
                _ => Token::Literal(token),
            };
            out.push(token);
        }
        if out.len() % 2 == 1 && out.last() != Some(&Token::Rest) {
            return Err(invalid("the last tag has no value (a path is tag/value pairs)".into()));
        }
        Ok(Pattern { tokens: out })
    }

    /// The pattern matching exactly `path`, even when a value contains `*` or `>`.
    ///
    /// ```
    /// use omni::path::Path;
    /// use omni::pubsub::Pattern;
    ///
    /// let room = Path::room("a1", "r1").unwrap();
    /// assert!(Pattern::exact(&room).matches("app/a1/room/r1"));
    /// ```
    pub fn exact(path: &Path) -> Pattern {
        let tokens = path
            .hops()
            .iter()
            .flat_map(|h| [Token::Literal(h.tag.as_str().to_owned()), Token::Literal(h.value.clone())])
            .collect();
        Pattern { tokens }
    }

    /// True when `subject` (canonical path text) matches; text that is not a
    /// valid path never matches. Reads the text in place, without building
    /// the path: every broadcast record and watched change goes through here.
    pub fn matches(&self, subject: &str) -> bool {
        if subject.is_empty() || subject.len() > MAX_PATH_BYTES {
            return false;
        }
        let (mut count, mut matched, mut rest) = (0, true, Some(subject));
        while let Some(text) = rest {
            let Some((token, after)) = next_token(text) else { return false };
            // Valid as a path's token: a known tag, or a non-empty value.
            let valid = if count % 2 == 0 { Tag::ALL.iter().any(|t| t.as_str() == token) } else { !token.is_empty() };
            if !valid {
                return false;
            }
            matched &= match self.tokens.get(count) {
                Some(Token::Literal(literal)) => unescaped_eq(token, literal),
                Some(Token::One | Token::Rest) => true,
                None => matches!(self.tokens.last(), Some(Token::Rest)),
            };
            count += 1;
            rest = after;
        }
        if count % 2 == 1 {
            return false; // the last tag has no value
        }
        matched
            && match self.tokens.last() {
                Some(Token::Rest) => count >= self.tokens.len(),
                _ => count == self.tokens.len(),
            }
    }

    /// True when `path` matches.
    pub fn matches_path(&self, path: &Path) -> bool {
        let subject: Vec<&str> = path.hops().iter().flat_map(|h| [h.tag.as_str(), h.value.as_str()]).collect();
        for (i, token) in self.tokens.iter().enumerate() {
            match token {
                Token::Rest => return subject.len() > i,
                Token::One if i < subject.len() => {}
                Token::Literal(l) if subject.get(i) == Some(&l.as_str()) => {}
                _ => return false,
            }
        }
        subject.len() == self.tokens.len()
    }

    /// True when the pattern has no wildcard, so it names a single path.
    pub fn is_literal(&self) -> bool {
        self.tokens.iter().all(|t| matches!(t, Token::Literal(_)))
    }
}

/// The first token of `text`, still escaped, and the text after its `/`
/// (`None` after the last token); `None` for an invalid escape.
fn next_token(text: &str) -> Option<(&str, Option<&str>)> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' => return Some((&text[..i], Some(&text[i + 1..]))),
            b'\\' if matches!(bytes.get(i + 1), Some(b'/' | b'\\')) => i += 2,
            b'\\' => return None,
            _ => i += 1,
        }
    }
    Some((text, None))
}

/// Whether an escaped token reads as `plain` once unescaped.
fn unescaped_eq(escaped: &str, plain: &str) -> bool {
    let mut plain = plain.bytes();
    let mut escaped = escaped.bytes();
    while let Some(mut byte) = escaped.next() {
        if byte == b'\\' {
            byte = escaped.next().unwrap_or(b'\\');
        }
        if plain.next() != Some(byte) {
            return false;
        }
    }
    plain.next().is_none()
}

impl FromStr for Pattern {
    type Err = PubSubError;

    fn from_str(text: &str) -> Result<Pattern, PubSubError> {
        Pattern::parse(text)
    }
}

/// Prints the pattern in the syntax [`Pattern::parse`] reads. A literal
/// value that is exactly `*` or `>` (possible only through
/// [`Pattern::exact`]) prints like the wildcard, because paths have no
/// escape for those characters.
impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, token) in self.tokens.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            match token {
                Token::Literal(l) => escape_into(l, f)?,
                Token::One => f.write_str("*")?,
                Token::Rest => f.write_str(">")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::Hop;
    use proptest::prelude::*;

    fn p(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    #[test]
    fn a_literal_pattern_matches_only_its_own_path() {
        let pattern = p("app/a1/room/r1");
        assert!(pattern.is_literal());
        assert!(pattern.matches("app/a1/room/r1"));
        assert!(!pattern.matches("app/a1/room/r2"));
        assert!(!pattern.matches("app/a1/room/r1/user/u"));
        assert!(!pattern.matches("app/a1"));
    }

    #[test]
    fn a_star_matches_exactly_one_token() {
        let pattern = p("app/*/room/r9");
        assert!(!pattern.is_literal());
        assert!(pattern.matches("app/x/room/r9"));
        assert!(pattern.matches("app/a\\/b/room/r9"));
        assert!(!pattern.matches("app/x/room/r1"));
        assert!(!pattern.matches("app/x/room/r9/user/u"));
        assert!(!pattern.matches("region/eu/app/x/room/r9"));
        assert!(p("*/x/room/*").matches("channel/x/room/r"));
    }

    #[test]
    fn a_final_gt_matches_one_or_more_tokens() {
        let pattern = p("app/>");
        assert!(pattern.matches("app/a"));
        assert!(pattern.matches("app/a/room/r"));
        assert!(pattern.matches("app/a/room/r/user/u/session/s"));
        assert!(!pattern.matches("app"));
        assert!(!pattern.matches("channel/a/room/r"));
        let rooms_of_a = p("app/a/room/>");
        assert!(rooms_of_a.matches("app/a/room/r"));
        assert!(!rooms_of_a.matches("app/a"));
        assert!(p(">").matches("app/a"));
    }

    #[test]
    fn escapes_are_respected() {
        let pattern = p("app/a\\/b/room/*");
        assert!(pattern.matches("app/a\\/b/room/r"));
        // Unescaped, `a/b` would be more tokens and not a valid path.
        assert!(!pattern.matches("app/a/b/room/r"));
        assert!(!pattern.matches("app/a\\\\/room/r"));
        assert!(p("app/a\\\\b/>").matches("app/a\\\\b/room/r"));
        assert_eq!(pattern.to_string(), "app/a\\/b/room/*");
    }

    #[test]
    fn invalid_subjects_never_match() {
        for subject in ["", "app", "app/", "app//room/r", "app/a\\", "app/a\\x", "planet/x", "app/a/room"] {
            assert!(!p(">").matches(subject), "{subject:?}");
            assert!(!p("app/>").matches(subject), "{subject:?}");
        }
    }

    #[test]
    fn invalid_patterns_are_rejected_with_a_reason() {
        for (text, needle) in [
            ("", "empty"),
            ("app//room/r", "empty"),
            ("app/a/", "empty"),
            ("app/>/room/r", "last token"),
            ("app/r*", "whole tokens"),
            ("app/a>b", "whole tokens"),
            ("app/a\\/*", "whole tokens"),
            ("planet/*", "unknown tag"),
            ("app/*/rooms/r", "unknown tag"),
            ("app/*/room", "no value"),
            ("app/a\\x", "escape"),
            ("app/a\\", "escape"),
        ] {
            match Pattern::parse(text) {
                Err(PubSubError::InvalidPattern { pattern, reason }) => {
                    assert_eq!(pattern, text);
                    assert!(reason.contains(needle), "{text:?}: {reason}");
                }
                other => panic!("{text:?} parsed as {other:?}"),
            }
        }
        let long = format!("app/{}", "x".repeat(MAX_PATH_BYTES));
        assert!(Pattern::parse(&long).is_err());
    }

    #[test]
    fn exact_matches_values_that_look_like_wildcards() {
        let path = Path::room("*", ">").unwrap();
        let pattern = Pattern::exact(&path);
        assert!(pattern.is_literal());
        assert!(pattern.matches("app/*/room/>"));
        assert!(!pattern.matches("app/x/room/>"));
    }

    /// Paths whose values may contain `*` and `>`, which only [`Pattern::exact`] can name.
    fn arb_path() -> impl Strategy<Value = Path> {
        arb_path_of("[a-z0-9/\\\\._*>-]{1,8}")
    }

    /// Paths that pattern text can name literally.
    fn arb_plain_path() -> impl Strategy<Value = Path> {
        arb_path_of("[a-z0-9/\\\\._-]{1,8}")
    }

    fn arb_path_of(values: &'static str) -> impl Strategy<Value = Path> {
        let hop = (0usize..7, values).prop_map(|(t, value)| Hop { tag: Tag::ALL[t], value });
        prop::collection::vec(hop, 1..6).prop_map(|hops| Path::new(hops).unwrap())
    }

    /// The path's tokens, escaped, as pattern text pieces.
    fn escaped_tokens(path: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for hop in path.hops() {
            out.push(hop.tag.as_str().to_owned());
            let mut value = String::new();
            escape_into(&hop.value, &mut value).unwrap();
            out.push(value);
        }
        out
    }

    /// Text of up to four tag/value pairs drawn from `tags` and `values`, then one of `tails`.
    fn texts(
        tags: &'static [&'static str],
        values: &'static [&'static str],
        tails: &'static [&'static str],
    ) -> impl Strategy<Value = String> {
        let pair = (prop::sample::select(tags), prop::sample::select(values));
        (prop::collection::vec(pair, 0..4), prop::sample::select(tails)).prop_map(|(pairs, tail)| {
            let body: Vec<String> = pairs.iter().map(|(tag, value)| format!("{tag}/{value}")).collect();
            format!("{}{tail}", body.join("/")).trim_start_matches('/').to_owned()
        })
    }

    proptest! {
        #[test]
        fn exact_matches_exactly_its_own_path(a in arb_path(), b in arb_path()) {
            let pattern = Pattern::exact(&a);
            prop_assert!(pattern.matches(&a.to_string()));
            prop_assert_eq!(pattern.matches(&b.to_string()), a == b);
        }

        #[test]
        fn a_literal_path_text_parses_to_the_exact_pattern(path in arb_plain_path()) {
            let text = path.to_string();
            let pattern = p(&text);
            prop_assert!(pattern.is_literal());
            prop_assert_eq!(&pattern, &Pattern::exact(&path));
            prop_assert_eq!(pattern.to_string(), text);
        }

        #[test]
        fn stars_match_any_value_in_their_place(path in arb_path(), mask in prop::collection::vec(any::<bool>(), 12), other in arb_path()) {
            let mut pieces = escaped_tokens(&path);
            for (i, piece) in pieces.iter_mut().enumerate() {
                if mask[i % mask.len()] || piece.contains(['*', '>']) {
                    *piece = "*".into();
                }
            }
            let pattern = p(&pieces.join("/"));
            prop_assert!(pattern.matches(&path.to_string()));
            // Anything else it matches has the same shape and agrees on every literal token.
            if pattern.matches(&other.to_string()) {
                let theirs = escaped_tokens(&other);
                prop_assert_eq!(theirs.len(), pieces.len());
                for (mine, theirs) in pieces.iter().zip(&theirs) {
                    prop_assert!(mine == "*" || mine == theirs);
                }
            }
        }

        #[test]
        fn a_gt_matches_exactly_the_longer_paths_with_that_prefix(path in arb_plain_path(), other in arb_plain_path(), keep in 0usize..12) {
            let pieces = escaped_tokens(&path);
            let keep = keep % (pieces.len() + 1);
            let prefix = &pieces[..keep];
            let mut text = prefix.join("/");
            if !text.is_empty() {
                text.push('/');
            }
            text.push('>');
            let pattern = p(&text);
            prop_assert_eq!(pattern.matches(&path.to_string()), keep < pieces.len());
            let theirs = escaped_tokens(&other);
            prop_assert_eq!(pattern.matches(&other.to_string()), theirs.len() > keep && theirs[..keep] == *prefix);
        }

        #[test]
        fn display_round_trips(text in "[a-z*>/]{1,30}") {
            if let Ok(pattern) = Pattern::parse(&text) {
                prop_assert_eq!(p(&pattern.to_string()), pattern);
            }
        }

        #[test]
        fn matching_in_place_agrees_with_parsing_the_path(
            pattern in texts(&["app", "room", "user", "x", "*"], &["a", "b", "a\\/b", "*", ""], &["", "/>", "/app"]),
            subject in texts(&["app", "room", "user", "x"], &["a", "b", "a\\/b", "a\\\\", "", "a\\x"], &["", "/app", "\\"]),
            real in arb_path(),
        ) {
            let parsed = |pattern: &Pattern, subject: &str| {
                subject.parse::<Path>().is_ok_and(|path| pattern.matches_path(&path))
            };
            let real_text = real.to_string();
            for pattern in [Pattern::parse(&pattern).ok(), Some(Pattern::exact(&real))].into_iter().flatten() {
                for subject in [subject.as_str(), real_text.as_str(), "app/a/room/r"] {
                    prop_assert_eq!(pattern.matches(subject), parsed(&pattern, subject), "{} on {:?}", pattern, subject);
                }
            }
        }

        #[test]
        fn nothing_panics(pattern in "\\PC{0,40}", subject in "\\PC{0,40}") {
            if let Ok(pattern) = Pattern::parse(&pattern) {
                let _ = pattern.matches(&subject);
                let _ = pattern.to_string();
            }
        }
    }
}
