//! Newline-delimited framing for the stdio transport, with a size cap: a line
//! longer than the cap is skipped — keeping only a short prefix, so its id can
//! still be answered — instead of being buffered without bound.

use std::io::BufRead;

/// How much of the start of an oversized line is kept.
const PREFIX: usize = 1024;
/// How much of the end of an oversized line is kept.
const SUFFIX: usize = 256;

/// One frame read from a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its line ending.
    Line(Vec<u8>),
    /// A line longer than the cap: its length, first bytes and last bytes
    /// (enough to find its id, wherever the sender put it).
    Oversized {
        /// Total length of the line in bytes.
        len: usize,
        /// Its first bytes.
        prefix: Vec<u8>,
        /// Its last bytes.
        suffix: Vec<u8>,
    },
}

/// Reads frames of at most `max` bytes from `reader`.
pub struct FrameReader<R> {
    reader: R,
    max: usize,
}

impl<R: BufRead> FrameReader<R> {
    /// Wraps a buffered reader.
    pub fn new(reader: R, max: usize) -> Self {
        Self { reader, max }
    }

    /// The next non-blank frame, or `None` at end of stream. A last line
    /// without a newline still counts. Memory stays bounded by the cap.
    pub fn read_frame(&mut self) -> std::io::Result<Option<Frame>> {
        let mut line = Vec::new(); // the line, up to the cap
        let mut tail = Vec::new(); // what came after the cap, trimmed to its end
        let mut len = 0usize;
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                if len == 0 || len <= self.max && is_blank(&line) {
                    return Ok(None);
                }
                return Ok(Some(self.finish(line, tail, len)));
            }
            let newline = chunk.iter().position(|b| *b == b'\n');
            let part = &chunk[..newline.unwrap_or(chunk.len())];
            len += part.len();
            let (head, rest) = part.split_at(self.max.saturating_sub(line.len()).min(part.len()));
            line.extend_from_slice(head);
            tail.extend_from_slice(rest);
            if tail.len() > 2 * SUFFIX {
                tail.drain(..tail.len() - SUFFIX);
            }
            let consumed = newline.map_or(chunk.len(), |i| i + 1);
            self.reader.consume(consumed);
            if newline.is_some() {
                if len <= self.max && is_blank(&line) {
                    line.clear();
                    len = 0;
                    continue;
                }
                return Ok(Some(self.finish(line, tail, len)));
            }
        }
    }

    fn finish(&self, mut line: Vec<u8>, tail: Vec<u8>, len: usize) -> Frame {
        if len > self.max {
            let mut end = line[line.len().saturating_sub(SUFFIX)..].to_vec();
            end.extend_from_slice(&tail);
            let suffix = end[end.len().saturating_sub(SUFFIX)..].to_vec();
            line.truncate(PREFIX);
            return Frame::Oversized {
                len,
                prefix: line,
                suffix,
            };
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Frame::Line(line)
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], max: usize) -> Vec<Frame> {
        let mut reader = FrameReader::new(input, max);
        let mut out = Vec::new();
        while let Some(frame) = reader.read_frame().unwrap() {
            out.push(frame);
        }
        out
    }

    #[test]
    fn splits_lines_and_skips_blank_ones() {
        let got = frames(b"{\"a\":1}\r\n\n  \n{\"b\":2}", 100);
        assert_eq!(
            got,
            vec![
                Frame::Line(b"{\"a\":1}".to_vec()),
                Frame::Line(b"{\"b\":2}".to_vec())
            ]
        );
    }

    #[test]
    fn caps_long_lines_and_carries_on() {
        let long = vec![b'x'; 5000];
        let mut input = long.clone();
        input.extend_from_slice(b"\n{\"ok\":true}\n");
        let got = frames(&input, 2048);
        assert_eq!(got.len(), 2);
        match &got[0] {
            Frame::Oversized {
                len,
                prefix,
                suffix,
            } => {
                assert_eq!(*len, 5000);
                assert_eq!(prefix.len(), PREFIX);
                assert_eq!(suffix.len(), SUFFIX);
            }
            other => panic!("expected oversized, got {other:?}"),
        }
        assert_eq!(got[1], Frame::Line(b"{\"ok\":true}".to_vec()));
    }

    #[test]
    fn an_oversized_line_keeps_its_first_and_last_bytes() {
        let mut input = b"{\"result\":\"".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100_000));
        input.extend_from_slice(b"\",\"id\":7}\n");
        let got = frames(&input, 4096);
        let [Frame::Oversized { prefix, suffix, .. }] = got.as_slice() else {
            panic!("expected one oversized frame, got {got:?}");
        };
        assert!(prefix.starts_with(b"{\"result\""));
        assert!(suffix.ends_with(b"\"id\":7}"));
    }

    #[test]
    fn a_line_of_exactly_the_cap_is_accepted() {
        let got = frames(&[b'y'; 1024], 1024);
        assert_eq!(got, vec![Frame::Line(vec![b'y'; 1024])]);
    }
}
