//! Byte-level mutations of seed inputs for observer's proptest fuzz tests (its `fuzz_tests`
//! modules and `tests/fuzz`). Each mutation picks its position with [`Index`], so it applies to
//! a seed of any length and shrinks towards the start of the input and fewer edits.

use proptest::prelude::*;
use proptest::sample::Index;

/// One edit of an input.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Delete up to `len` bytes at a position.
    Delete(Index, u8),
    /// Insert arbitrary bytes at a position.
    Insert(Index, Vec<u8>),
    /// Insert one of the target's dictionary tokens at a position.
    Token(Index, Index),
    /// Overwrite one byte.
    Replace(Index, u8),
    /// Flip one bit.
    Flip(Index, u8),
    /// Repeat a line.
    DupLine(Index),
    /// Remove a line.
    DropLine(Index),
    /// Exchange two lines.
    SwapLines(Index, Index),
    /// Cut the input at a position.
    Truncate(Index),
}

/// Up to `max` mutations.
pub fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        1 => (any::<Index>(), 1u8..32).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Mutation::Token(i, t)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        1 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<Index>().prop_map(Mutation::DupLine),
        1 => any::<Index>().prop_map(Mutation::DropLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ];
    prop::collection::vec(one, 0..=max)
}

/// Applies `muts` to `seed`; `tokens` is the dictionary for [`Mutation::Token`].
pub fn apply(seed: &[u8], muts: &[Mutation], tokens: &[&str]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in muts {
        // Positions range over 0..=len so that appending is possible.
        let pos = |i: &Index, b: &Vec<u8>| i.index(b.len() + 1);
        match m {
            Mutation::Delete(i, n) => {
                let at = pos(i, &b);
                let end = (at + usize::from(*n)).min(b.len());
                b.drain(at..end);
            }
            Mutation::Insert(i, bytes) => {
                let at = pos(i, &b);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Token(i, t) => {
                if !tokens.is_empty() {
                    let at = pos(i, &b);
                    let tok = tokens[t.index(tokens.len())].as_bytes();
                    b.splice(at..at, tok.iter().copied());
                }
            }
            Mutation::Replace(i, byte) => {
                if !b.is_empty() {
                    let at = i.index(b.len());
                    b[at] = *byte;
                }
            }
            Mutation::Flip(i, bit) => {
                if !b.is_empty() {
                    let at = i.index(b.len());
                    b[at] ^= 1 << bit;
                }
            }
            Mutation::DupLine(i) => {
                let mut lines = split_lines(&b);
                if !lines.is_empty() {
                    let at = i.index(lines.len());
                    lines.insert(at, lines[at].clone());
                    b = lines.concat();
                }
            }
            Mutation::DropLine(i) => {
                let mut lines = split_lines(&b);
                if !lines.is_empty() {
                    lines.remove(i.index(lines.len()));
                    b = lines.concat();
                }
            }
            Mutation::SwapLines(x, y) => {
                let mut lines = split_lines(&b);
                if !lines.is_empty() {
                    let (x, y) = (x.index(lines.len()), y.index(lines.len()));
                    lines.swap(x, y);
                    b = lines.concat();
                }
            }
            Mutation::Truncate(i) => {
                let at = pos(i, &b);
                b.truncate(at);
            }
        }
    }
    b
}

/// Lines with their `\n`.
fn split_lines(b: &[u8]) -> Vec<Vec<u8>> {
    b.split_inclusive(|c| *c == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}
