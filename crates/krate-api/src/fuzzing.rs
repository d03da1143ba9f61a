//! Helpers for the bounded fuzz tests of krate's crates (here and in the API server): a
//! small deterministic generator, so a failure repeats, and byte-level mutation of
//! corpus entries. Test support, not API.

/// xorshift64: small, fast and deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A string of 1 to `most` pieces.
    pub fn text(&mut self, pieces: &[&str], most: usize) -> String {
        let count = self.below(most) + 1;
        (0..count).map(|_| pieces[self.below(pieces.len())]).collect()
    }
}

impl Default for Rng {
    /// The fixed seed every fuzz test starts from.
    fn default() -> Self {
        Rng(0x2545_F491_4F6C_DD1D)
    }
}

/// A byte-level mutation of `seed`: a flip, a cut, an insertion or a repeat.
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    const INSERTS: &[&[u8]] =
        &[b"\"", b"{", b"}", b"[", b"]", b",", b"=", b"(", b")", b"\\", b"\xc3\xa9", b"\xff", b"\0"];
    let mut out = seed.to_vec();
    for _ in 0..=rng.below(3) {
        let at = rng.below(out.len() + 1);
        match rng.below(4) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 => out.truncate(at),
            2 => {
                let piece = INSERTS[rng.below(INSERTS.len())];
                out.splice(at..at, piece.iter().copied());
            }
            _ => {
                let end = (at + rng.below(8)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
        }
    }
    out
}

/// The entries of a corpus file's text: one per line, `#` lines left out; with `hex`,
/// each line is the bytes in hexadecimal.
pub fn corpus(text: &str, hex: bool) -> Vec<Vec<u8>> {
    let lines = text.lines().filter(|l| !l.starts_with('#'));
    if hex {
        let byte = |pair: &[u8]| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
        lines.map(|l| l.as_bytes().chunks(2).map(byte).collect()).collect()
    } else {
        lines.map(|l| l.as_bytes().to_vec()).collect()
    }
}

/// Every entry and `per_entry` mutations of each.
pub fn with_mutations(entries: &[Vec<u8>], per_entry: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::default();
    let mut inputs = Vec::new();
    for seed in entries {
        inputs.extend((0..per_entry).map(|_| mutate(&mut rng, seed)));
        inputs.push(seed.clone());
    }
    inputs
}
