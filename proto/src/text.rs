//! Client-supplied text in status messages and logs, bounded.
//!
//! Anything a client sends (instance names, resource names, paths, user
//! names) may be megabytes long or full of control characters. Echoing it
//! whole would let one request bloat the logs, or push a status message past
//! the gRPC metadata limit so that the client sees "metadata size exceeds
//! hard limit" instead of the real refusal. [`quoted`] shows such text
//! escaped and cut to a few dozen characters; [`clip_message`] is the last
//! line of defence that bounds a whole status message.

use std::fmt;

use crate::limits::{MESSAGE_LENGTH_MAX, QUOTED_CHARS_MAX};

/// Client-supplied text, shown escaped and in quotes, cut after
/// [`QUOTED_CHARS_MAX`] characters with the full length noted.
#[derive(Clone, Copy)]
pub struct Quoted<'a> {
    text: &'a str,
    chars_max: usize,
}

/// Shows `text` escaped, in quotes, and bounded.
pub fn quoted(text: &str) -> Quoted<'_> {
    Quoted { text, chars_max: QUOTED_CHARS_MAX }
}

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.text.char_indices().nth(self.chars_max) {
            None => write!(f, "{:?}", self.text),
            Some((cut, _)) => {
                write!(f, "{:?}... ({} bytes in all)", &self.text[..cut], self.text.len())
            }
        }
    }
}

impl fmt::Debug for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Cuts a status message to at most [`MESSAGE_LENGTH_MAX`] bytes, on a
/// character boundary, marking the cut.
pub fn clip_message(message: String) -> String {
    if message.len() <= MESSAGE_LENGTH_MAX {
        return message;
    }
    const MARK: &str = " ... (message cut)";
    let mut end = MESSAGE_LENGTH_MAX - MARK.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut clipped = message;
    clipped.truncate(end);
    clipped.push_str(MARK);
    clipped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_quoted_whole() {
        assert_eq!(quoted("main.dev").to_string(), "\"main.dev\"");
        assert_eq!(quoted("a\nb").to_string(), "\"a\\nb\"");
    }

    #[test]
    fn long_text_is_cut_with_its_length() {
        let long = "é".repeat(100_000);
        let shown = quoted(&long).to_string();
        assert!(shown.len() < 4 * QUOTED_CHARS_MAX, "{} bytes", shown.len());
        assert!(shown.ends_with("(200000 bytes in all)"), "{shown}");
    }

    #[test]
    fn messages_are_clipped_on_char_boundaries() {
        let m = clip_message("ü".repeat(MESSAGE_LENGTH_MAX));
        assert!(m.len() <= MESSAGE_LENGTH_MAX);
        assert!(m.ends_with("(message cut)"));
        assert_eq!(clip_message("short".into()), "short");
    }
}
