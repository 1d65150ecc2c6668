//! Recognises secrets in text — cloud keys, private keys, access tokens — with
//! hand-written scanners instead of regular expressions, so a fresh policy
//! instance pays no pattern-compilation cost. It only finds; callers decide.

/// One secret found in a text, as a byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind of secret it looks like, e.g. `aws-access-key-id`.
    pub kind: &'static str,
    /// Byte offset of the first byte.
    pub start: usize,
    /// Byte offset one past the last byte.
    pub end: usize,
}

/// A token made of a fixed prefix and a run of body characters.
struct Token {
    kind: &'static str,
    prefixes: &'static [&'static str],
    body: fn(u8) -> bool,
    min: usize,
    max: usize,
}

fn upper_or_digit(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}
fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}
fn alnum_underscore(b: u8) -> bool {
    alnum(b) || b == b'_'
}
fn alnum_dash(b: u8) -> bool {
    alnum(b) || b == b'-'
}
fn base64url(b: u8) -> bool {
    alnum(b) || b == b'-' || b == b'_'
}

const TOKENS: &[Token] = &[
    Token {
        kind: "aws-access-key-id",
        prefixes: &["AKIA", "ASIA"],
        body: upper_or_digit,
        min: 16,
        max: 16,
    },
    Token {
        kind: "github-token",
        prefixes: &["ghp_", "gho_", "ghu_", "ghs_", "ghr_"],
        body: alnum,
        min: 36,
        max: 255,
    },
    Token {
        kind: "github-token",
        prefixes: &["github_pat_"],
        body: alnum_underscore,
        min: 22,
        max: 255,
    },
    Token {
        kind: "slack-token",
        prefixes: &["xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-"],
        body: alnum_dash,
        min: 10,
        max: 255,
    },
    Token {
        kind: "google-api-key",
        prefixes: &["AIza"],
        body: base64url,
        min: 35,
        max: 35,
    },
    Token {
        kind: "stripe-secret-key",
        prefixes: &["sk_live_", "rk_live_"],
        body: alnum,
        min: 16,
        max: 255,
    },
];

/// Every secret found in `text`, ordered by position, without overlaps.
pub fn find(text: &str) -> Vec<Finding> {
    let mut found = Vec::new();
    for token in TOKENS {
        for prefix in token.prefixes {
            for (start, _) in text.match_indices(prefix) {
                if let Some(end) = token_end(text.as_bytes(), start, prefix.len(), token) {
                    found.push(Finding {
                        kind: token.kind,
                        start,
                        end,
                    });
                }
            }
        }
    }
    found.extend(private_keys(text));
    found.extend(jwts(text));
    found.sort_by_key(|f| (f.start, std::cmp::Reverse(f.end)));
    let mut disjoint: Vec<Finding> = Vec::with_capacity(found.len());
    for f in found {
        if disjoint.last().is_none_or(|last| f.start >= last.end) {
            disjoint.push(f);
        }
    }
    disjoint
}

/// True if `text` holds at least one secret.
pub fn contains(text: &str) -> bool {
    !find(text).is_empty()
}

/// `text` with every secret replaced by `[REDACTED:<kind>]`, or `None` when
/// there was nothing to redact.
pub fn redact(text: &str) -> Option<String> {
    let found = find(text);
    if found.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in found {
        out.push_str(&text[at..f.start]);
        out.push_str("[REDACTED:");
        out.push_str(f.kind);
        out.push(']');
        at = f.end;
    }
    out.push_str(&text[at..]);
    Some(out)
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn token_end(bytes: &[u8], start: usize, prefix_len: usize, token: &Token) -> Option<usize> {
    if start > 0 && is_word(bytes[start - 1]) {
        return None;
    }
    let body_start = start + prefix_len;
    let run = bytes[body_start..]
        .iter()
        .take(token.max + 1)
        .take_while(|b| (token.body)(**b))
        .count();
    (token.min..=token.max)
        .contains(&run)
        .then_some(body_start + run)
}

/// PEM private key blocks; an unterminated block runs to the end of the text.
fn private_keys(text: &str) -> impl Iterator<Item = Finding> + '_ {
    text.match_indices("-----BEGIN ")
        .filter_map(move |(start, _)| {
            let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            if !text[start..line_end].contains("PRIVATE KEY-----") {
                return None;
            }
            let end = text[line_end..]
                .find("-----END ")
                .and_then(|i| {
                    let from = line_end + i;
                    text[from..]
                        .find("KEY-----")
                        .map(|j| from + j + "KEY-----".len())
                })
                .unwrap_or(text.len());
            Some(Finding {
                kind: "private-key",
                start,
                end,
            })
        })
}

/// JSON Web Tokens: three base64url segments, the first two starting `eyJ`.
fn jwts(text: &str) -> impl Iterator<Item = Finding> + '_ {
    let bytes = text.as_bytes();
    text.match_indices("eyJ").filter_map(move |(start, _)| {
        if start > 0 && (is_word(bytes[start - 1]) || bytes[start - 1] == b'.') {
            return None;
        }
        let mut at = start;
        for segment in 0..3 {
            let len = bytes[at..].iter().take_while(|b| base64url(**b)).count();
            if len < 8 {
                return None;
            }
            at += len;
            if segment < 2 {
                if bytes.get(at) != Some(&b'.') {
                    return None;
                }
                at += 1;
                if segment == 0 && !text[at..].starts_with("eyJ") {
                    return None;
                }
            }
        }
        Some(Finding {
            kind: "jwt",
            start,
            end: at,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_aws_key_id_on_word_boundaries_only() {
        let text = "key=AKIAIOSFODNN7EXAMPLE and xAKIAIOSFODNN7EXAMPLE";
        let found = find(text);
        assert_eq!(found.len(), 1);
        assert_eq!(&text[found[0].start..found[0].end], "AKIAIOSFODNN7EXAMPLE");
    }

    #[test]
    fn redacts_private_key_block_and_github_token() {
        let text = "a\n-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\nb ghp_abcdefghijklmnopqrstuvwxyz0123456789 c";
        assert_eq!(
            redact(text).unwrap(),
            "a\n[REDACTED:private-key]\nb [REDACTED:github-token] c"
        );
    }

    #[test]
    fn finds_jwt_but_not_plain_words() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert!(contains(&format!("token: {jwt}")));
        assert!(!contains("the eyJ of the storm. nothing here"));
        assert_eq!(redact("plain text"), None);
    }
}
