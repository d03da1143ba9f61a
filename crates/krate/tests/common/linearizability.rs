//! A linearizability checker for one compare-and-swap register, as etcd's robustness
//! tests check their histories with porcupine: the Wing–Gong search with Lowe's
//! memoization (a set of linearized operations and the register's value is tried once).
//!
//! The register is an object's value; every successful write writes a value never
//! written before, so comparing values is comparing resourceVersions. Operations:
//! a read that returned a value; a compare-and-swap from a value read before to a new
//! one that succeeded, was refused as a conflict, or whose outcome is unknown (an error
//! or timeout: it may have happened at any time after its call, or never).

use std::collections::HashSet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Conflict,
    Unknown,
}

#[derive(Clone, Debug)]
pub enum Kind {
    Read(String),
    Cas { from: String, to: String, outcome: Outcome },
}

/// One operation: when it was called and when it returned (microseconds from any
/// common origin; an unknown outcome's return does not matter).
#[derive(Clone, Debug)]
pub struct Op {
    pub call: u64,
    pub ret: u64,
    pub kind: Kind,
}

impl Op {
    fn unknown(&self) -> bool {
        matches!(self.kind, Kind::Cas { outcome: Outcome::Unknown, .. })
    }

    /// The register after this operation at `state`, or None if it cannot happen there.
    fn step(&self, state: &str) -> Option<String> {
        match &self.kind {
            Kind::Read(value) => (value == state).then(|| state.to_string()),
            Kind::Cas { from, to, outcome: Outcome::Ok | Outcome::Unknown } => (from == state).then(|| to.clone()),
            Kind::Cas { from, outcome: Outcome::Conflict, .. } => (from != state).then(|| state.to_string()),
        }
    }
}

/// Whether `history`, starting from `initial`, is linearizable.
pub fn linearizable(initial: &str, history: &[Op]) -> bool {
    let mut ops: Vec<Op> = history.to_vec();
    for op in &mut ops {
        if op.unknown() {
            op.ret = u64::MAX;
        }
    }
    ops.sort_by_key(|op| op.call);
    // Which operations are placed, hashed (each op flips its own random bits), with the
    // register's value: a configuration tried once is never tried again.
    let marks: Vec<u64> = (0..ops.len() as u64).map(splitmix).collect();
    let mut seen: HashSet<(u64, String)> = HashSet::new();
    let mut done = vec![false; ops.len()];
    let mut placed = 0u64;
    let mut state = initial.to_string();
    // The operations placed, in order, with the value before each.
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut cursor = 0;
    loop {
        if ops.iter().zip(&done).all(|(op, d)| *d || op.unknown()) {
            return true;
        }
        // The next one may be any pending operation called before every pending one
        // returned (ops are sorted by call).
        let deadline = ops.iter().zip(&done).filter(|(_, d)| !**d).map(|(op, _)| op.ret).min().unwrap_or(u64::MAX);
        let mut chosen = None;
        for i in cursor..ops.len() {
            if ops[i].call > deadline {
                break;
            }
            if done[i] {
                continue;
            }
            if let Some(next) = ops[i].step(&state) {
                if seen.insert((placed ^ marks[i], next.clone())) {
                    chosen = Some((i, next));
                    break;
                }
            }
        }
        match chosen {
            Some((i, next)) => {
                done[i] = true;
                placed ^= marks[i];
                stack.push((i, std::mem::replace(&mut state, next)));
                cursor = 0;
            }
            None => {
                let Some((i, before)) = stack.pop() else { return false };
                done[i] = false;
                placed ^= marks[i];
                state = before;
                cursor = i + 1;
            }
        }
    }
}

fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
