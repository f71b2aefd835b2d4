//! Turns selector text into tokens with byte positions. Context-sensitive like Calico's
//! tokenizer: right after a label key the words `in`, `not in`, `contains`, `starts with`
//! and `ends with` are operators; elsewhere a run of key characters is a label key.

use std::fmt;

use super::error::SelectorError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tok<'a> {
    Label(&'a str),
    Str(&'a str),
    Has(&'a str),
    All,
    Global,
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    Eq,
    Ne,
    In,
    NotIn,
    Contains,
    StartsWith,
    EndsWith,
    Not,
    And,
    Or,
    Eof,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Token<'a> {
    pub(super) tok: Tok<'a>,
    /// Byte offset of the token's first character.
    pub(super) pos: usize,
}

impl fmt::Display for Tok<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Label(k) => write!(f, "label {k:?}"),
            Tok::Str(s) => write!(f, "string {s:?}"),
            Tok::Has(k) => write!(f, "has({k})"),
            Tok::All => f.write_str("all()"),
            Tok::Global => f.write_str("global()"),
            Tok::LParen => f.write_str("'('"),
            Tok::RParen => f.write_str("')'"),
            Tok::LBrace => f.write_str("'{'"),
            Tok::RBrace => f.write_str("'}'"),
            Tok::Comma => f.write_str("','"),
            Tok::Eq => f.write_str("'=='"),
            Tok::Ne => f.write_str("'!='"),
            Tok::In => f.write_str("'in'"),
            Tok::NotIn => f.write_str("'not in'"),
            Tok::Contains => f.write_str("'contains'"),
            Tok::StartsWith => f.write_str("'starts with'"),
            Tok::EndsWith => f.write_str("'ends with'"),
            Tok::Not => f.write_str("'!'"),
            Tok::And => f.write_str("'&&'"),
            Tok::Or => f.write_str("'||'"),
            Tok::Eof => f.write_str("end of input"),
        }
    }
}

/// Characters Calico accepts in a label key (`[a-zA-Z0-9_./-]`), which covers
/// Kubernetes-style prefixes such as `projectcalico.org/name`.
pub(super) fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

const OPERATOR_EXPECTED: &str =
    "an operator (==, !=, in, not in, contains, starts with, ends with)";
const OPERAND_EXPECTED: &str = "a label, '(', '!', has(), all() or global()";

pub(super) fn tokenize(input: &str) -> Result<Vec<Token<'_>>, SelectorError> {
    let mut lx = Lexer { input, pos: 0 };
    let mut out: Vec<Token<'_>> = Vec::new();
    loop {
        lx.skip_ws();
        let pos = lx.pos;
        let after_label = matches!(
            out.last(),
            Some(Token {
                tok: Tok::Label(_),
                ..
            })
        );
        let tok = lx.next_token(after_label)?;
        let done = tok == Tok::Eof;
        out.push(Token { tok, pos });
        if done {
            return Ok(out);
        }
    }
}

struct Lexer<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    /// Only space and tab, as in Calico: a newline in a selector is rejected there too,
    /// so tortie accepts exactly the selectors calicoctl and Felix accept.
    fn skip_ws(&mut self) {
        let skipped = self.rest().len() - self.rest().trim_start_matches([' ', '\t']).len();
        self.pos += skipped;
    }

    fn eat(&mut self, word: &str) -> bool {
        if self.rest().starts_with(word) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    fn key(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        let len = rest.bytes().take_while(|b| is_key_byte(*b)).count();
        if len == 0 {
            return None;
        }
        self.pos += len;
        Some(&rest[..len])
    }

    fn error(&self, pos: usize, expected: impl Into<String>) -> SelectorError {
        SelectorError::syntax(self.input, pos, expected, found_at(self.input, pos))
    }

    fn next_token(&mut self, after_label: bool) -> Result<Tok<'a>, SelectorError> {
        let start = self.pos;
        let Some(&b) = self.input.as_bytes().get(start) else {
            return Ok(Tok::Eof);
        };
        let single = match b {
            b'(' => Some(Tok::LParen),
            b')' => Some(Tok::RParen),
            b'{' => Some(Tok::LBrace),
            b'}' => Some(Tok::RBrace),
            b',' => Some(Tok::Comma),
            _ => None,
        };
        if let Some(tok) = single {
            self.pos += 1;
            return Ok(tok);
        }
        match b {
            b'"' | b'\'' => self.string(b as char),
            b'=' if self.eat("==") => Ok(Tok::Eq),
            b'=' => Err(self.error(start, "'=='")),
            b'!' if self.eat("!=") => Ok(Tok::Ne),
            b'!' => {
                self.pos += 1;
                Ok(Tok::Not)
            }
            b'&' if self.eat("&&") => Ok(Tok::And),
            b'&' => Err(self.error(start, "'&&'")),
            b'|' if self.eat("||") => Ok(Tok::Or),
            b'|' => Err(self.error(start, "'||'")),
            _ if after_label => self.word_operator(),
            _ => self.operand(),
        }
    }

    /// A quoted value. There are no escapes: the value ends at the next quote of the same
    /// kind, so `"it's"` and `'say "hi"'` work but a value cannot hold both kinds.
    fn string(&mut self, quote: char) -> Result<Tok<'a>, SelectorError> {
        let open = self.pos;
        let body = &self.input[open + 1..];
        match body.find(quote) {
            Some(len) => {
                self.pos = open + 1 + len + 1;
                Ok(Tok::Str(&body[..len]))
            }
            None => Err(self.error(
                self.input.len(),
                format!("closing {quote} for the string opened at position {open}"),
            )),
        }
    }

    fn word_operator(&mut self) -> Result<Tok<'a>, SelectorError> {
        let start = self.pos;
        if self.eat("contains") {
            return Ok(Tok::Contains);
        }
        // Calico accepts "startswith" and "starts  with" alike; so do we.
        for (first, tok) in [("starts", Tok::StartsWith), ("ends", Tok::EndsWith)] {
            if self.eat(first) {
                self.skip_ws();
                if self.eat("with") {
                    return Ok(tok);
                }
                return Err(self.error(self.pos, format!("'with' after '{first}'")));
            }
        }
        if self.eat("not") {
            self.skip_ws();
            if self.eat("in") {
                return Ok(Tok::NotIn);
            }
            return Err(self.error(self.pos, "'in' after 'not'"));
        }
        if self.eat("in") {
            return Ok(Tok::In);
        }
        Err(self.error(start, OPERATOR_EXPECTED))
    }

    /// `has(k)`, `all()`, `global()` (the parenthesis must follow the name directly, as in
    /// Calico, so a label may itself be called `has` or `all`) or a plain label key.
    fn operand(&mut self) -> Result<Tok<'a>, SelectorError> {
        let start = self.pos;
        if self.eat("has(") {
            self.skip_ws();
            let key_pos = self.pos;
            let Some(key) = self.key() else {
                return Err(self.error(key_pos, "a label name inside has()"));
            };
            self.close_paren()?;
            return Ok(Tok::Has(key));
        }
        for (name, tok) in [("all(", Tok::All), ("global(", Tok::Global)] {
            if self.eat(name) {
                self.close_paren()?;
                return Ok(tok);
            }
        }
        match self.key() {
            Some(key) => Ok(Tok::Label(key)),
            None => Err(self.error(start, OPERAND_EXPECTED)),
        }
    }

    fn close_paren(&mut self) -> Result<(), SelectorError> {
        self.skip_ws();
        if self.eat(")") {
            Ok(())
        } else {
            Err(self.error(self.pos, "')'"))
        }
    }
}

/// What sits at `pos`, for error messages: a whole word when it starts like a label key,
/// else the single character.
pub(super) fn found_at(input: &str, pos: usize) -> String {
    let rest = input.get(pos..).unwrap_or("");
    let word_len = rest.bytes().take_while(|b| is_key_byte(*b)).count();
    if word_len > 0 {
        return format!("{:?}", &rest[..word_len]);
    }
    match rest.chars().next() {
        Some(c) => format!("{c:?}"),
        None => "end of input".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok<'_>> {
        tokenize(s)
            .expect("tokenizes")
            .into_iter()
            .map(|t| t.tok)
            .collect()
    }

    #[test]
    fn operators_after_a_label_are_words_not_labels() {
        assert_eq!(
            toks("a in {'x'} && b not in {} && c contains 'z'"),
            vec![
                Tok::Label("a"),
                Tok::In,
                Tok::LBrace,
                Tok::Str("x"),
                Tok::RBrace,
                Tok::And,
                Tok::Label("b"),
                Tok::NotIn,
                Tok::LBrace,
                Tok::RBrace,
                Tok::And,
                Tok::Label("c"),
                Tok::Contains,
                Tok::Str("z"),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn starts_with_and_ends_with_accept_missing_space_like_calico() {
        assert_eq!(
            toks("a startswith 'x'"),
            vec![Tok::Label("a"), Tok::StartsWith, Tok::Str("x"), Tok::Eof]
        );
        assert_eq!(
            toks("a ends \t with 'x'"),
            vec![Tok::Label("a"), Tok::EndsWith, Tok::Str("x"), Tok::Eof]
        );
    }

    #[test]
    fn words_that_name_functions_are_labels_without_a_parenthesis() {
        assert_eq!(
            toks("has == 'x'"),
            vec![Tok::Label("has"), Tok::Eq, Tok::Str("x"), Tok::Eof]
        );
        assert_eq!(
            toks("has( k8s.io/x )"),
            vec![Tok::Has("k8s.io/x"), Tok::Eof]
        );
        assert_eq!(toks("all( )"), vec![Tok::All, Tok::Eof]);
    }

    #[test]
    fn token_positions_are_byte_offsets_of_the_token_start() {
        let t = tokenize("  a  ==\t'é' ").expect("tokenizes");
        let pos: Vec<usize> = t.iter().map(|t| t.pos).collect();
        assert_eq!(pos, vec![2, 5, 8, 13]);
    }

    #[test]
    fn a_string_may_hold_the_other_kind_of_quote() {
        assert_eq!(
            toks(r#"'say "hi"'"#),
            vec![Tok::Str(r#"say "hi""#), Tok::Eof]
        );
        assert_eq!(toks(r#""it's""#), vec![Tok::Str("it's"), Tok::Eof]);
    }

    #[test]
    fn newline_is_not_whitespace_as_in_calico() {
        let err = tokenize("a == 'b'\n").expect_err("newline rejected");
        assert_eq!(err.position(), Some(8));
    }
}
