//! Mutations of seed inputs: bit flips, interesting bytes and 32-bit words (0, -1, lengths near
//! the input's), truncation, insertion, deletion, duplication, splicing two seeds, and for text
//! inputs replacing a token with values decoders get wrong (huge or negative numbers, empty or
//! nested values, non-ASCII).

/// A deterministic mutator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Mutator {
    state: u64,
}

const BYTES: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, b'"', b'\n'];
const TOKENS: [&str; 16] = [
    "-1",
    "0",
    "1e309",
    "18446744073709551616",
    "4294967296",
    "\"\"",
    "null",
    "[]",
    "{}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "NaN",
    "-Infinity",
    "\"\u{00e9}\u{1F600}\"",
    "true",
    "\"../../../../etc/passwd\"",
    "99999999999999999999999999999999",
];

impl Mutator {
    /// A mutator whose choices follow from `seed`.
    pub fn new(seed: u64) -> Mutator {
        Mutator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A mutation of one of `corpus` (1 to 4 changes; within the first `focus` bytes unless
    /// `focus` is 0).
    pub fn mutate(&mut self, corpus: &[Vec<u8>], text: bool, focus: usize) -> Vec<u8> {
        let mut v = corpus[self.below(corpus.len())].clone();
        for _ in 0..1 + self.below(4) {
            self.once(&mut v, corpus, text, focus);
        }
        v
    }

    fn once(&mut self, v: &mut Vec<u8>, corpus: &[Vec<u8>], text: bool, focus: usize) {
        let kinds = if text { 10 } else { 9 };
        let span = |v: &Vec<u8>| match focus {
            0 => v.len(),
            f => v.len().min(f),
        };
        let at = |m: &mut Mutator, v: &Vec<u8>| m.below(span(v).max(1));
        match self.below(kinds) {
            0 if !v.is_empty() => {
                let i = at(self, v);
                v[i] ^= 1 << self.below(8);
            }
            1 if !v.is_empty() => {
                let i = at(self, v);
                v[i] = BYTES[self.below(BYTES.len())];
            }
            2 if span(v) >= 4 => {
                let i = self.below(span(v) - 3);
                let len = v.len() as u32;
                let words = [
                    0,
                    1,
                    u32::MAX,
                    0x7fff_ffff,
                    len,
                    len.wrapping_add(1),
                    len / 2,
                    1 << 20,
                ];
                let w = words[self.below(words.len())];
                v[i..i + 4].copy_from_slice(&w.to_le_bytes());
            }
            3 => {
                let n = at(self, v);
                v.truncate(n);
            }
            4 => {
                let i = at(self, v).min(v.len());
                let n = 1 + self.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| self.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            5 if !v.is_empty() => {
                let i = at(self, v);
                let n = (1 + self.below(16)).min(v.len() - i);
                v.drain(i..i + n);
            }
            6 if !v.is_empty() => {
                let i = at(self, v);
                let n = (1 + self.below(64)).min(v.len() - i);
                let chunk = v[i..i + n].to_vec();
                let j = at(self, v).min(v.len());
                v.splice(j..j, chunk);
            }
            7 => {
                let other = &corpus[self.below(corpus.len())];
                let (i, j) = (
                    at(self, v).min(v.len()),
                    self.below(other.len().max(1)).min(other.len()),
                );
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            8 if !v.is_empty() => {
                // A run of one byte (a length field or a string grown large).
                let i = at(self, v);
                let n = 1 + self.below(512);
                let b = v[i];
                v.splice(i..i, std::iter::repeat_n(b, n));
            }
            9 => {
                // Text: replace the token at a random place with an interesting one.
                let i = at(self, v).min(v.len());
                let end = v[i..]
                    .iter()
                    .position(|c| matches!(c, b',' | b'\n' | b' ' | b'}' | b']' | b'='))
                    .map_or(v.len(), |p| i + p);
                let t = TOKENS[self.below(TOKENS.len())].as_bytes().to_vec();
                v.splice(i..end, t);
            }
            _ => {}
        }
    }
}
