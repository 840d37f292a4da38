//! Seeded randomness, split per purpose. candle's CPU generator cannot be seeded, so every random
//! draw in the project (initialisation, shuffling, augmentation, algorithm draws) comes from here.

use rand::SeedableRng;
pub use rand_chacha::ChaCha8Rng as Rng;

/// A generator for one purpose (`"init"`, `"shuffle/epoch3"`, `"algorithms[0].progressive_resizing"`),
/// derived from the run seed. Different purposes give independent streams; the same seed and
/// purpose always give the same stream, whatever else the run does.
pub fn stream(seed: u64, purpose: &str) -> Rng {
    Rng::seed_from_u64(mix(seed, purpose))
}

/// A generator for item `index` of a purpose (one sample's augmentation, say), cheap to create.
pub fn item_stream(seed: u64, purpose: &str, index: u64) -> Rng {
    Rng::seed_from_u64(splitmix(mix(seed, purpose) ^ splitmix(index)))
}

/// Streams of one purpose keyed by an index (the batch): what an algorithm draws at batch k
/// depends only on the seed, its place in the recipe and k, so a run resumed at batch k draws
/// exactly what the uninterrupted run drew.
#[derive(Debug, Clone)]
pub struct Streams {
    seed: u64,
    purpose: String,
}

impl Streams {
    pub fn new(seed: u64, purpose: &str) -> Self {
        Streams {
            seed,
            purpose: purpose.to_string(),
        }
    }

    /// The generator for item `index`.
    pub fn at(&self, index: u64) -> Rng {
        item_stream(self.seed, &self.purpose, index)
    }
}

fn mix(seed: u64, purpose: &str) -> u64 {
    // FNV-1a over the purpose, folded with the seed through splitmix64: stable across platforms
    // and Rust versions (std's hashers are not).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in purpose.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    splitmix(seed ^ splitmix(h))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng as _;

    #[test]
    fn same_seed_and_purpose_same_stream_and_purposes_differ() {
        let a: Vec<u32> = (0..8)
            .map(|_| 0)
            .scan(stream(7, "init"), |r, _: u32| Some(r.random()))
            .collect();
        let b: Vec<u32> = (0..8)
            .map(|_| 0)
            .scan(stream(7, "init"), |r, _: u32| Some(r.random()))
            .collect();
        let c: Vec<u32> = (0..8)
            .map(|_| 0)
            .scan(stream(7, "shuffle"), |r, _: u32| Some(r.random()))
            .collect();
        let d: Vec<u32> = (0..8)
            .map(|_| 0)
            .scan(stream(8, "init"), |r, _: u32| Some(r.random()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_ne!(
            item_stream(7, "aug", 1).random::<u64>(),
            item_stream(7, "aug", 2).random::<u64>()
        );
    }
}
