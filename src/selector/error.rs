//! The selector module's one error type. Every variant carries the selector text (shortened
//! when very long, so a pathological input cannot flood a log line) and, for syntax errors,
//! the 0-based byte position where parsing stopped and what would have been accepted there.

/// Longest selector text echoed back in an error message.
const MAX_ECHO: usize = 120;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("selector {selector:?}: expected {expected} at position {position}, found {found}")]
    Syntax {
        selector: String,
        position: usize,
        expected: String,
        found: String,
    },
    #[error(
        "selector {selector:?}: parentheses nested deeper than {max} levels at position {position}"
    )]
    TooDeep {
        selector: String,
        position: usize,
        max: usize,
    },
    #[error("selector {selector:?} is {len} bytes long, {field} allows at most {max}")]
    TooLong {
        selector: String,
        len: usize,
        max: usize,
        field: &'static str,
    },
    #[error("selector {selector:?}: global() is not allowed in {field}")]
    GlobalNotAllowed {
        selector: String,
        field: &'static str,
    },
}

impl SelectorError {
    pub(super) fn syntax(
        input: &str,
        position: usize,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        SelectorError::Syntax {
            selector: echo(input),
            position,
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// Byte position of a syntax or nesting error; `None` for whole-selector errors.
    pub fn position(&self) -> Option<usize> {
        match self {
            SelectorError::Syntax { position, .. } | SelectorError::TooDeep { position, .. } => {
                Some(*position)
            }
            SelectorError::TooLong { .. } | SelectorError::GlobalNotAllowed { .. } => None,
        }
    }
}

/// The selector as quoted in messages: cut at a char boundary after `MAX_ECHO` bytes.
pub(super) fn echo(input: &str) -> String {
    if input.len() <= MAX_ECHO {
        return input.to_owned();
    }
    let mut end = MAX_ECHO;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &input[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_selectors_are_shortened_in_messages() {
        let long = "a".repeat(5000);
        let err = SelectorError::syntax(&long, 4999, "')'", "end of input");
        let msg = err.to_string();
        assert!(msg.len() < 300, "message too long: {} bytes", msg.len());
        assert!(msg.contains("position 4999"));
    }

    #[test]
    fn shortening_never_splits_a_multibyte_char() {
        let s = "é".repeat(100); // 200 bytes, 2 per char
        let shown = echo(&s);
        assert!(shown.ends_with('…'));
        assert_eq!(shown.trim_end_matches('…').len(), MAX_ECHO);
    }
}
