//! Time: a value and a unit, resolved once at bind time into batches (the trainer's clock).
//!
//! Units: `ep` (epochs), `ba` (optimizer steps), `sp` (samples), `tok` (tokens), `dur` (fraction of
//! the scaled run). Fractional values are allowed in every unit (`1.5ep`, `0.3dur`, `6e6tok`).
//! Resolution rounds to the nearest batch, and a positive time never rounds to zero.

use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeUnit {
    Epoch,
    Batch,
    Sample,
    Token,
    Duration,
}

impl TimeUnit {
    pub const ALL: [TimeUnit; 5] = [
        TimeUnit::Epoch,
        TimeUnit::Batch,
        TimeUnit::Sample,
        TimeUnit::Token,
        TimeUnit::Duration,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            TimeUnit::Epoch => "ep",
            TimeUnit::Batch => "ba",
            TimeUnit::Sample => "sp",
            TimeUnit::Token => "tok",
            TimeUnit::Duration => "dur",
        }
    }
}

/// A point or a span of training time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Time {
    pub value: f64,
    pub unit: TimeUnit,
}

const TIME_HINT: &str = "write a number and a unit: 90ep, 1.5ep, 500ba, 2048sp, 6e6tok, 0.3dur";

impl Time {
    pub fn new(value: f64, unit: TimeUnit) -> Result<Self> {
        let t = Time { value, unit };
        if !value.is_finite() || value < 0.0 {
            return Err(Error::Time {
                input: t.to_string(),
                message: "a time must be a finite number >= 0".into(),
            });
        }
        if unit == TimeUnit::Duration && value > 1.0 {
            return Err(Error::Time {
                input: t.to_string(),
                message: "a `dur` time is a fraction of the run and must be in [0, 1]".into(),
            });
        }
        Ok(t)
    }
    pub fn epochs(v: f64) -> Self {
        Time {
            value: v,
            unit: TimeUnit::Epoch,
        }
    }
    pub fn batches(v: f64) -> Self {
        Time {
            value: v,
            unit: TimeUnit::Batch,
        }
    }
    pub fn dur(v: f64) -> Self {
        Time {
            value: v,
            unit: TimeUnit::Duration,
        }
    }

    /// The same time scaled by `ratio` in its own unit. `dur` is relative to the (scaled) run and
    /// therefore does not change.
    pub fn scaled(self, ratio: f64) -> Self {
        match self.unit {
            TimeUnit::Duration => self,
            _ => Time {
                value: self.value * ratio,
                unit: self.unit,
            },
        }
    }

    /// Resolves this time into batches, rounding to the nearest batch; a positive time never
    /// resolves to zero.
    pub fn to_batches(&self, clock: &Clock) -> Result<u64> {
        let exact = self.to_batches_exact(clock)?;
        if !exact.is_finite() || exact > MAX_BATCHES {
            return Err(Error::Time {
                input: self.to_string(),
                message: format!(
                    "resolves to {exact:e} batches, more than a run can take ({MAX_BATCHES:e})"
                ),
            });
        }
        Ok(round_batches(exact))
    }

    /// The exact (unrounded) number of batches this time spans.
    pub fn to_batches_exact(&self, clock: &Clock) -> Result<f64> {
        let err = |m: String| Error::Time {
            input: self.to_string(),
            message: m,
        };
        Ok(match self.unit {
            TimeUnit::Batch => self.value,
            TimeUnit::Epoch => self.value * clock.batches_per_epoch as f64,
            TimeUnit::Sample => self.value / clock.samples_per_batch as f64,
            TimeUnit::Token => match clock.tokens_per_sample {
                Some(t) => self.value / (t * clock.samples_per_batch as f64),
                None => {
                    return Err(err(
                        "this dataset has no tokens; use ep, ba, sp or dur".into()
                    ))
                }
            },
            TimeUnit::Duration => match clock.max_batches {
                Some(m) => self.value * m as f64,
                None => {
                    return Err(err(
                        "the run length itself cannot be given in `dur`; use ep, ba, sp or tok"
                            .into(),
                    ))
                }
            },
        })
    }
}

/// The largest batch count a time may resolve to (integers are exact in f64 up to here).
pub const MAX_BATCHES: f64 = 9_007_199_254_740_992.0;

/// Rounds a batch count to the nearest integer; a positive count never becomes zero.
pub fn round_batches(exact: f64) -> u64 {
    let r = exact.round();
    if exact > 0.0 && r < 1.0 {
        1
    } else {
        r as u64
    }
}

/// What a Time is resolved against: the training loader and the (scaled) run length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    pub batches_per_epoch: u64,
    pub samples_per_batch: u64,
    pub tokens_per_sample: Option<f64>,
    /// The run length in batches, once it is known (needed for `dur`).
    pub max_batches: Option<u64>,
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.value, self.unit.suffix())
    }
}

impl FromStr for Time {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let input = s.trim();
        let bad = |m: &str| Error::Time {
            input: s.to_string(),
            message: format!("{m}; {TIME_HINT}"),
        };
        // The unit is the trailing run of letters: `6e6tok` -> (`6e6`, `tok`).
        let idx = input
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .len();
        let (num, unit) = input.split_at(idx);
        let unit = match unit.to_ascii_lowercase().as_str() {
            "ep" => TimeUnit::Epoch,
            "ba" => TimeUnit::Batch,
            "sp" => TimeUnit::Sample,
            "tok" => TimeUnit::Token,
            "dur" => TimeUnit::Duration,
            "" => return Err(bad("no unit")),
            other => return Err(bad(&format!("unknown unit {other:?}"))),
        };
        let value: f64 = num
            .trim()
            .parse()
            .map_err(|_| bad(&format!("{num:?} is not a number")))?;
        Time::new(value, unit).map_err(|e| match e {
            Error::Time { message, .. } => Error::Time {
                input: s.to_string(),
                message,
            },
            other => other,
        })
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Time;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a time such as 90ep, 500ba or 0.3dur")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Time, E> {
                v.parse().map_err(|e: Error| E::custom(e))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Time, E> {
                Err(E::custom(format!(
                    "bad time {v}: no unit; write {v}ep, {v}ba, {v}sp or {v}tok"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Time, E> {
                self.visit_u64(v.unsigned_abs())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Time, E> {
                Err(E::custom(format!(
                    "bad time {v}: no unit; write {v}ep, {v}ba or, for a fraction of the run, {v}dur"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where training stands: counters in every unit, advanced by the trainer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timestamp {
    pub epoch: u64,
    pub batch: u64,
    pub sample: u64,
    pub token: u64,
    pub batch_in_epoch: u64,
    pub sample_in_epoch: u64,
}

impl Timestamp {
    pub fn next_batch(&mut self, samples: u64, tokens: u64) {
        self.batch += 1;
        self.batch_in_epoch += 1;
        self.sample += samples;
        self.sample_in_epoch += samples;
        self.token += tokens;
    }

    pub fn next_epoch(&mut self) {
        self.epoch += 1;
        self.batch_in_epoch = 0;
        self.sample_in_epoch = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn clock() -> Clock {
        Clock {
            batches_per_epoch: 468,
            samples_per_batch: 128,
            tokens_per_sample: None,
            max_batches: Some(4680),
        }
    }

    #[test]
    fn parses_every_unit() {
        let cases = [
            ("90ep", 90.0, TimeUnit::Epoch),
            ("1.5ep", 1.5, TimeUnit::Epoch),
            ("500ba", 500.0, TimeUnit::Batch),
            ("0.3dur", 0.3, TimeUnit::Duration),
            ("6e6tok", 6e6, TimeUnit::Token),
            ("2048sp", 2048.0, TimeUnit::Sample),
            (" 3EP ", 3.0, TimeUnit::Epoch),
            ("1e2ep", 100.0, TimeUnit::Epoch),
        ];
        for (s, v, u) in cases {
            let t: Time = s.parse().unwrap();
            assert_eq!((t.value, t.unit), (v, u), "{s}");
        }
    }

    #[test]
    fn rejects_bad_strings_with_a_reason() {
        for s in [
            "", "ep", "12", "12xx", "-1ep", "1.5dur", "nanep", "infba", "1..2ep",
        ] {
            let e = s.parse::<Time>().unwrap_err().to_string();
            assert!(e.contains("bad time"), "{s}: {e}");
        }
    }

    #[test]
    fn resolves_with_rounding_to_nearest_and_never_to_zero() {
        let c = clock();
        assert_eq!(Time::epochs(1.0).to_batches(&c).unwrap(), 468);
        assert_eq!(Time::epochs(1.5).to_batches(&c).unwrap(), 702);
        assert_eq!("200sp".parse::<Time>().unwrap().to_batches(&c).unwrap(), 2);
        assert_eq!("10sp".parse::<Time>().unwrap().to_batches(&c).unwrap(), 1);
        assert_eq!(
            "0.001ep".parse::<Time>().unwrap().to_batches(&c).unwrap(),
            1
        );
        assert_eq!("0ep".parse::<Time>().unwrap().to_batches(&c).unwrap(), 0);
        assert_eq!(Time::dur(0.25).to_batches(&c).unwrap(), 1170);
        assert!("1e6tok".parse::<Time>().unwrap().to_batches(&c).is_err());
        let no_max = Clock {
            max_batches: None,
            ..c
        };
        assert!(Time::dur(0.5).to_batches(&no_max).is_err());
    }

    #[test]
    fn scaling_keeps_fractions_and_leaves_dur_alone() {
        // Composer truncates 90ep x 0.36 to 32ep; we keep 32.4ep.
        let t = Time::epochs(90.0).scaled(0.36);
        assert!((t.value - 32.4).abs() < 1e-9);
        assert_eq!(Time::dur(0.3).scaled(0.5), Time::dur(0.3));
    }

    fn arb_unit() -> impl Strategy<Value = TimeUnit> {
        prop::sample::select(TimeUnit::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(v in 0.0f64..1e9, unit in arb_unit()) {
            let v = if unit == TimeUnit::Duration { v / 1e9 } else { v };
            let t = Time::new(v, unit).unwrap();
            let back: Time = t.to_string().parse().unwrap();
            prop_assert_eq!(back, t);
        }

        #[test]
        fn positive_times_never_resolve_to_zero(v in 1e-9f64..1e4, unit in arb_unit(),
                                                bpe in 1u64..5000, bs in 1u64..4096, max in 1u64..1_000_000) {
            let v = if unit == TimeUnit::Duration { v / 1e4 } else { v };
            let c = Clock { batches_per_epoch: bpe, samples_per_batch: bs,
                            tokens_per_sample: Some(7.0), max_batches: Some(max) };
            let t = Time::new(v, unit).unwrap();
            prop_assert!(t.to_batches(&c).unwrap() >= 1);
        }

        #[test]
        fn conversions_agree_across_units(epochs in 0.0f64..100.0, bpe in 1u64..2000, bs in 1u64..512) {
            // The same span expressed in ep, ba and sp resolves to the same batch count.
            let c = Clock { batches_per_epoch: bpe, samples_per_batch: bs,
                            tokens_per_sample: Some(16.0), max_batches: None };
            let ep = Time::epochs(epochs).to_batches_exact(&c).unwrap();
            let ba = Time::batches(epochs * bpe as f64).to_batches_exact(&c).unwrap();
            let sp = Time::new(epochs * (bpe * bs) as f64, TimeUnit::Sample).unwrap().to_batches_exact(&c).unwrap();
            let tok = Time::new(epochs * (bpe * bs) as f64 * 16.0, TimeUnit::Token).unwrap().to_batches_exact(&c).unwrap();
            prop_assert!((ep - ba).abs() <= 1e-6 * ep.max(1.0));
            prop_assert!((ep - sp).abs() <= 1e-6 * ep.max(1.0));
            prop_assert!((ep - tok).abs() <= 1e-6 * ep.max(1.0));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,12}") {
            let _ = s.parse::<Time>();
        }
    }
}
