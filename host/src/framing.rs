//! Newline-delimited framing for the stdio transport, with a size cap: a line
//! longer than the cap is skipped — keeping only a short prefix, so its id can
//! still be answered — instead of being buffered without bound.

use std::io::BufRead;

/// How much of an oversized line is kept.
const PREFIX: usize = 1024;

/// One frame read from a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its line ending.
    Line(Vec<u8>),
    /// A line longer than the cap: its length and first bytes.
    Oversized {
        /// Total length of the line in bytes.
        len: usize,
        /// Its first bytes.
        prefix: Vec<u8>,
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
    /// without a newline still counts.
    pub fn read_frame(&mut self) -> std::io::Result<Option<Frame>> {
        let mut line = Vec::new();
        let mut len = 0usize;
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                if len == 0 || is_blank(&line) && len <= self.max {
                    return Ok(None);
                }
                return Ok(Some(self.finish(line, len)));
            }
            let newline = chunk.iter().position(|b| *b == b'\n');
            let part = &chunk[..newline.unwrap_or(chunk.len())];
            len += part.len();
            let keep = if len > self.max { PREFIX } else { self.max };
            let room = keep.saturating_sub(line.len());
            line.extend_from_slice(&part[..part.len().min(room)]);
            let consumed = newline.map_or(chunk.len(), |i| i + 1);
            self.reader.consume(consumed);
            if newline.is_some() {
                if len <= self.max && is_blank(&line) {
                    line.clear();
                    len = 0;
                    continue;
                }
                return Ok(Some(self.finish(line, len)));
            }
        }
    }

    fn finish(&self, mut line: Vec<u8>, len: usize) -> Frame {
        if len > self.max {
            line.truncate(PREFIX);
            return Frame::Oversized { len, prefix: line };
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
            Frame::Oversized { len, prefix } => {
                assert_eq!(*len, 5000);
                assert_eq!(prefix.len(), PREFIX);
            }
            other => panic!("expected oversized, got {other:?}"),
        }
        assert_eq!(got[1], Frame::Line(b"{\"ok\":true}".to_vec()));
    }

    #[test]
    fn a_line_of_exactly_the_cap_is_accepted() {
        let got = frames(&[b'y'; 1024], 1024);
        assert_eq!(got, vec![Frame::Line(vec![b'y'; 1024])]);
    }
}
