//! Reading a trail file line by line, never whole: each line is at most
//! [`MAX_LINE`] bytes (a record holds at most a message of
//! `limits.max_message_bytes` and its answer), a longer one is skipped and
//! named, and bytes that are not UTF-8 are named too, so one bad line never
//! stops the reading of the rest.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// The longest line read.
pub const MAX_LINE: usize = 64 << 20;

/// One line of a trail file.
pub enum Line {
    /// A line of text (without its newline).
    Text(String),
    /// A line that is not UTF-8: why.
    Unreadable(String),
}

/// The lines of `path`, with their numbers (1-based).
pub fn of(path: &Path) -> Result<impl Iterator<Item = Result<(usize, Line)>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(lines(BufReader::new(file), MAX_LINE))
}

/// The lines `reader` gives, each at most `max` bytes.
fn lines(mut reader: impl BufRead, max: usize) -> impl Iterator<Item = Result<(usize, Line)>> {
    let mut number = 0;
    std::iter::from_fn(move || {
        let mut bytes = Vec::new();
        let read = (&mut reader)
            .take(max as u64 + 1)
            .read_until(b'\n', &mut bytes);
        match read {
            Ok(0) => return None,
            Err(e) => return Some(Err(anyhow::Error::new(e).context("cannot read the trail"))),
            Ok(_) => {}
        }
        number += 1;
        if bytes.last() != Some(&b'\n') && bytes.len() > max {
            // Too long to hold: skipped to its end.
            let skipped = skip_line(&mut reader);
            let why = format!("longer than {max} bytes, not read");
            return Some(skipped.map(|()| (number, Line::Unreadable(why))));
        }
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        let line = match String::from_utf8(bytes) {
            Ok(text) => Line::Text(text),
            Err(e) => {
                Line::Unreadable(format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()))
            }
        };
        Some(Ok((number, line)))
    })
}

/// Reads `reader` up to the end of the line under way.
fn skip_line(reader: &mut impl BufRead) -> Result<()> {
    loop {
        let buffer = reader.fill_buf().context("cannot read the trail")?;
        if buffer.is_empty() {
            return Ok(());
        }
        match memchr::memchr(b'\n', buffer) {
            Some(at) => {
                reader.consume(at + 1);
                return Ok(());
            }
            None => {
                let all = buffer.len();
                reader.consume(all);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], max: usize) -> Vec<(usize, Result<String, String>)> {
        lines(bytes, max)
            .map(|line| {
                let (n, line) = line.unwrap();
                match line {
                    Line::Text(text) => (n, Ok(text)),
                    Line::Unreadable(why) => (n, Err(why)),
                }
            })
            .collect()
    }

    #[test]
    fn a_bad_line_is_named_and_the_rest_is_read() {
        let read = read(b"{\"a\":1}\n{\"b\":\xff}\n0123456789abc\n{\"c\":3}", 10);
        assert_eq!(read[0], (1, Ok("{\"a\":1}".into())));
        assert_eq!(read[1], (2, Err("not UTF-8 (byte 5)".into())));
        assert_eq!(read[2], (3, Err("longer than 10 bytes, not read".into())));
        assert_eq!(read[3], (4, Ok("{\"c\":3}".into())));
        assert_eq!(read.len(), 4);
    }
}
