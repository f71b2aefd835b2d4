//! Recursive-descent parser from tokens to `Expr`, following Calico's grammar:
//!   or  := and ('||' and)*        and := op ('&&' op)*
//!   op  := '!'* ( has(k) | all() | global() | '(' or ')' | k cmp "v" | k [not] in {"v", ...} )
//! `&&` binds tighter than `||`; `!` applies to one operation (`!a == 'x'` is `!(a == 'x')`).

use std::collections::BTreeSet;

use super::ast::{CompareOp, Expr};
use super::error::SelectorError;
use super::lexer::{Tok, Token, tokenize};

/// Deepest parenthesis nesting accepted. Real selectors nest a few levels; the cap keeps
/// parsing, evaluation, rendering and drop (all recursive) far from stack exhaustion.
pub const MAX_NESTING: usize = 64;

const OPERAND_EXPECTED: &str = "a label, '(', '!', has(), all() or global()";
const OPERATOR_EXPECTED: &str =
    "an operator (==, !=, in, not in, contains, starts with, ends with)";

/// Parses a selector. Empty (or blank) text is `all()`, as in Calico.
pub(super) fn parse(input: &str) -> Result<Expr, SelectorError> {
    let tokens = tokenize(input)?;
    let mut p = Parser {
        input,
        tokens,
        next: 0,
    };
    if p.peek() == &Tok::Eof {
        return Ok(Expr::All);
    }
    let expr = p.or_expr(0)?;
    if p.peek() != &Tok::Eof {
        return Err(p.unexpected("'&&', '||' or end of input"));
    }
    Ok(expr)
}

struct Parser<'a> {
    input: &'a str,
    tokens: Vec<Token<'a>>,
    next: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> &Tok<'a> {
        // The token list always ends in Eof and we never advance past it.
        &self.tokens[self.next.min(self.tokens.len() - 1)].tok
    }

    fn pos(&self) -> usize {
        self.tokens[self.next.min(self.tokens.len() - 1)].pos
    }

    fn advance(&mut self) -> Tok<'a> {
        let tok = self.peek().clone();
        if tok != Tok::Eof {
            self.next += 1;
        }
        tok
    }

    fn unexpected(&self, expected: &str) -> SelectorError {
        SelectorError::syntax(self.input, self.pos(), expected, self.peek().to_string())
    }

    fn or_expr(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        let mut ops = vec![self.and_expr(depth)?];
        while self.peek() == &Tok::Or {
            self.advance();
            ops.push(self.and_expr(depth)?);
        }
        Ok(collapse(ops, Expr::Or))
    }

    fn and_expr(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        let mut ops = vec![self.operation(depth)?];
        while self.peek() == &Tok::And {
            self.advance();
            ops.push(self.operation(depth)?);
        }
        Ok(collapse(ops, Expr::And))
    }

    fn operation(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        let mut negated = false;
        while self.peek() == &Tok::Not {
            self.advance();
            negated = !negated;
        }
        let expr = match self.peek().clone() {
            Tok::Has(key) => {
                self.advance();
                Expr::Has(key.to_owned())
            }
            Tok::All => {
                self.advance();
                Expr::All
            }
            Tok::Global => {
                self.advance();
                Expr::Global
            }
            Tok::LParen => self.group(depth)?,
            Tok::Label(key) => {
                self.advance();
                self.comparison(key)?
            }
            _ => return Err(self.unexpected(OPERAND_EXPECTED)),
        };
        if !negated {
            return Ok(expr);
        }
        // `!(!x)` is x: folding it here keeps render-then-parse an identity.
        Ok(match expr {
            Expr::Not(inner) => *inner,
            other => Expr::Not(Box::new(other)),
        })
    }

    fn group(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        if depth >= MAX_NESTING {
            return Err(SelectorError::TooDeep {
                selector: super::error::echo(self.input),
                position: self.pos(),
                max: MAX_NESTING,
            });
        }
        self.advance();
        let inner = self.or_expr(depth + 1)?;
        if self.peek() != &Tok::RParen {
            return Err(self.unexpected("')'"));
        }
        self.advance();
        Ok(inner)
    }

    fn comparison(&mut self, key: &str) -> Result<Expr, SelectorError> {
        let op = match self.peek() {
            Tok::Eq => CompareOp::Eq,
            Tok::Ne => CompareOp::Ne,
            Tok::Contains => CompareOp::Contains,
            Tok::StartsWith => CompareOp::StartsWith,
            Tok::EndsWith => CompareOp::EndsWith,
            Tok::In | Tok::NotIn => return self.set_membership(key),
            _ => return Err(self.unexpected(OPERATOR_EXPECTED)),
        };
        self.advance();
        let value = self.string()?;
        Ok(Expr::Compare {
            key: key.to_owned(),
            op,
            value: value.to_owned(),
        })
    }

    fn string(&mut self) -> Result<&'a str, SelectorError> {
        match self.peek() {
            Tok::Str(s) => {
                let s = *s;
                self.advance();
                Ok(s)
            }
            _ => Err(self.unexpected("a quoted string")),
        }
    }

    /// `{}` is valid (Calico accepts it) and so is a trailing comma: `{"a",}`.
    fn set_membership(&mut self, key: &str) -> Result<Expr, SelectorError> {
        let negated = self.advance() == Tok::NotIn;
        if self.peek() != &Tok::LBrace {
            return Err(self.unexpected("'{'"));
        }
        self.advance();
        let mut values = BTreeSet::new();
        while let Tok::Str(s) = self.peek() {
            values.insert((*s).to_owned());
            self.advance();
            if self.peek() != &Tok::Comma {
                break;
            }
            self.advance();
        }
        if self.peek() != &Tok::RBrace {
            return Err(self.unexpected("a quoted string, ',' or '}'"));
        }
        self.advance();
        Ok(Expr::InSet {
            key: key.to_owned(),
            values,
            negated,
        })
    }
}

fn collapse(mut ops: Vec<Expr>, group: fn(Vec<Expr>) -> Expr) -> Expr {
    if ops.len() == 1 {
        ops.swap_remove(0)
    } else {
        group(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> (usize, String) {
        let e = parse(s).expect_err(s);
        (e.position().expect("has position"), e.to_string())
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let e = parse("a == 'x' || b == 'y' && c == 'z'").expect("parses");
        assert_eq!(e.to_string(), r#"(a == "x" || (b == "y" && c == "z"))"#);
        let e = parse("a == 'x' && b == 'y' || c == 'z'").expect("parses");
        assert_eq!(e.to_string(), r#"((a == "x" && b == "y") || c == "z")"#);
    }

    #[test]
    fn parentheses_override_precedence() {
        let e = parse("(a == 'x' || b == 'y') && c == 'z'").expect("parses");
        assert_eq!(e.to_string(), r#"((a == "x" || b == "y") && c == "z")"#);
    }

    #[test]
    fn not_applies_to_one_operation() {
        let e = parse("!a == 'x' && has(b)").expect("parses");
        assert_eq!(e.to_string(), r#"(!a == "x" && has(b))"#);
    }

    #[test]
    fn double_negation_cancels_with_or_without_parentheses() {
        assert_eq!(parse("!!has(a)").expect("parses"), Expr::Has("a".into()));
        assert_eq!(parse("!(!has(a))").expect("parses"), Expr::Has("a".into()));
        assert_eq!(parse("! !! has(a)").expect("parses").to_string(), "!has(a)");
    }

    #[test]
    fn redundant_parentheses_disappear() {
        assert_eq!(parse(" ((( all() ))) ").expect("parses"), Expr::All);
    }

    #[test]
    fn unclosed_has_reports_missing_paren_at_end() {
        let (pos, msg) = err("has(a");
        assert_eq!(pos, 5);
        assert_eq!(
            msg,
            r#"selector "has(a": expected ')' at position 5, found end of input"#
        );
    }

    #[test]
    fn unclosed_group_reports_missing_paren() {
        assert_eq!(err("(a == 'x'").0, 9);
        assert_eq!(err("((has(a) && has(b))").0, 19);
    }

    #[test]
    fn stray_closing_paren_is_trailing_garbage() {
        let (pos, msg) = err("has(a))");
        assert_eq!(pos, 6);
        assert!(msg.contains("expected '&&', '||' or end of input"), "{msg}");
    }

    #[test]
    fn missing_value_is_reported_where_the_string_should_be() {
        let (pos, msg) = err("a == ");
        assert_eq!(pos, 5);
        assert!(msg.contains("expected a quoted string"), "{msg}");
        let (pos, msg) = err("a == b");
        assert_eq!(pos, 5);
        assert!(msg.contains(r#"found label "b""#), "{msg}");
    }

    #[test]
    fn single_equals_is_rejected_at_its_position() {
        let (pos, msg) = err("a = 'x'");
        assert_eq!(pos, 2);
        assert!(msg.contains("expected '=='"), "{msg}");
    }

    #[test]
    fn unterminated_strings_are_rejected() {
        let (pos, msg) = err("a == 'x");
        assert_eq!(pos, 7);
        assert!(msg.contains("string opened at position 5"), "{msg}");
        assert_eq!(err(r#"a == "x'"#).0, 8);
    }

    #[test]
    fn trailing_garbage_is_rejected() {
        assert_eq!(err("a == 'x' b").0, 9);
        assert_eq!(err("has(a) has(b)").0, 7);
        assert_eq!(err("all() &&").0, 8);
    }

    #[test]
    fn bare_label_and_label_pairs_need_an_operator() {
        assert_eq!(err("a").0, 1);
        let (pos, msg) = err("a b");
        assert_eq!(pos, 2);
        assert!(msg.contains("expected an operator"), "{msg}");
    }

    #[test]
    fn single_ampersand_and_pipe_are_rejected() {
        assert_eq!(err("has(a) & has(b)").0, 7);
        assert_eq!(err("has(a) | has(b)").0, 7);
    }

    #[test]
    fn empty_set_is_valid_but_a_lone_comma_is_not() {
        assert!(parse("a in {}").is_ok());
        assert!(parse("a not in {'x',}").is_ok());
        let (pos, msg) = err("a in {,}");
        assert_eq!(pos, 6);
        assert!(
            msg.contains("expected a quoted string, ',' or '}'"),
            "{msg}"
        );
        assert_eq!(err("a in {'x' 'y'}").0, 10);
        assert_eq!(err("a in 'x'").0, 5);
    }

    #[test]
    fn literal_on_the_left_and_empty_parens_are_rejected() {
        assert_eq!(err("'b1' == b").0, 0);
        assert_eq!(err("()").0, 1);
        assert_eq!(err(")").0, 0);
        assert_eq!(err("!").0, 1);
        assert_eq!(err("has()").0, 4);
        assert_eq!(err("all(x)").0, 4);
        assert_eq!(err("%").0, 0);
    }

    #[test]
    fn nesting_beyond_the_limit_is_rejected_without_recursing_further() {
        let ok = format!(
            "{}has(a){}",
            "(".repeat(MAX_NESTING),
            ")".repeat(MAX_NESTING)
        );
        assert!(parse(&ok).is_ok());
        let deep = format!("{}has(a)", "(".repeat(100_000));
        let e = parse(&deep).expect_err("too deep");
        assert!(matches!(e, SelectorError::TooDeep { position, .. } if position == MAX_NESTING));
    }
}
