//! Spike detector on synthetic deny-rate series with injected times.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic with context, like the tests"
)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use observer::alert::spike::{SpikeConfig, SpikeDetector, SpikeKey, SpikeTransition};
use observer::flow::Direction;

/// Deterministic noise (xorshift64*), so failures reproduce.
struct Noise(u64);

impl Noise {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `mean` ± `spread` (fraction of mean), rounded to whole packets without bias.
    fn packets(&mut self, mean: f64, spread: f64) -> u64 {
        let x = mean * (1.0 + spread * (2.0 * self.unit() - 1.0));
        let floor = x.floor();
        let extra = if self.unit() < x - floor { 1.0 } else { 0.0 };
        (floor + extra).max(0.0) as u64
    }
}

fn key(workload: &str) -> SpikeKey {
    SpikeKey {
        direction: Direction::Ingress,
        workload_namespace: "shop".into(),
        workload: workload.into(),
        expected: false,
    }
}

const T0: u64 = 1_800_000_000;

fn at(sec: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0 + sec)
}

/// Drives one key for `secs` seconds from `start`: each second observes `packets(t)` then
/// ticks, like the daemon's drain loop. Returns transitions with their second offsets.
fn run(
    d: &mut SpikeDetector,
    k: &SpikeKey,
    start: u64,
    secs: u64,
    mut packets: impl FnMut(u64) -> u64,
) -> Vec<(u64, SpikeTransition)> {
    let mut out = Vec::new();
    for s in start..start + secs {
        d.observe(at(s), k, packets(s));
        for t in d.tick(at(s)) {
            out.push((s, t));
        }
    }
    out
}

fn detector() -> SpikeDetector {
    SpikeDetector::new(SpikeConfig::default()).unwrap()
}

const HOUR: u64 = 3600;

#[test]
fn steady_background_never_fires_even_when_high() {
    for (i, mean) in [0.3, 5.0, 500.0, 50_000.0].into_iter().enumerate() {
        let mut d = detector();
        let k = key("api");
        let mut noise = Noise(0x9E37_79B9_7F4A_7C15 + i as u64);
        // ±100 % per-second noise: bursty, yet steady on average.
        let ts = run(&mut d, &k, 0, 6 * HOUR, |_| noise.packets(mean, 1.0));
        assert!(ts.is_empty(), "mean {mean}: {ts:?}");
        let st = d.status(&k).unwrap();
        assert!(!st.active);
        assert!(
            (st.baseline - mean).abs() < 0.2 * mean,
            "baseline {} should track {mean}",
            st.baseline
        );
    }
}

#[test]
fn sudden_flood_fires_after_for_and_reports_the_numbers() {
    let cfg = SpikeConfig::default();
    let mut d = detector();
    let k = key("cart");
    let mut noise = Noise(7);
    assert!(run(&mut d, &k, 0, 2 * HOUR, |_| noise.packets(5.0, 0.5)).is_empty());
    let flood = 2 * HOUR;
    let ts = run(&mut d, &k, flood, 10 * 60, |_| noise.packets(200.0, 0.2));
    assert_eq!(ts.len(), 1, "{ts:?}");
    let (when, t) = &ts[0];
    let delay = when - flood;
    let for_s = cfg.for_duration.as_secs();
    assert!(
        delay >= for_s && delay <= for_s + cfg.rate_window.as_secs(),
        "fired {delay} s after the flood began"
    );
    assert!(t.started);
    assert_eq!(t.key, k);
    assert_eq!(t.at, at(*when));
    assert!((t.baseline - 5.0).abs() < 1.0, "baseline {}", t.baseline);
    assert!(t.rate > 150.0, "rate {}", t.rate);
    assert!(t.threshold >= 3.0 * t.baseline && t.threshold < t.rate);
    assert!(d.status(&k).unwrap().active);
}

#[test]
fn blips_shorter_than_for_do_not_fire() {
    let mut d = detector();
    let k = key("cart");
    let mut noise = Noise(11);
    assert!(run(&mut d, &k, 0, HOUR, |_| noise.packets(5.0, 0.5)).is_empty());
    // 30 s floods every 3 minutes for an hour: each is under the 60 s `for`.
    let ts = run(&mut d, &k, HOUR, HOUR, |s| {
        if (s - HOUR) % 180 < 30 {
            noise.packets(500.0, 0.1)
        } else {
            noise.packets(5.0, 0.5)
        }
    });
    assert!(ts.is_empty(), "{ts:?}");
    // The blips did not teach the baseline to expect floods: a sustained one still fires.
    let ts = run(&mut d, &k, 2 * HOUR, 5 * 60, |_| noise.packets(500.0, 0.1));
    assert_eq!(ts.len(), 1, "{ts:?}");
    assert!(ts[0].1.started);
}

#[test]
fn hysteresis_keeps_one_spike_while_the_rate_wobbles_around_the_threshold() {
    let cfg = SpikeConfig::default();
    let mut d = detector();
    let k = key("cart");
    let mut noise = Noise(13);
    assert!(run(&mut d, &k, 0, HOUR, |_| noise.packets(5.0, 0.3)).is_empty());
    let upper = d.status(&k).unwrap().threshold;
    assert!(
        (14.0..16.5).contains(&upper),
        "upper threshold {upper} should be about 3 × 5"
    );

    let mut all = run(&mut d, &k, HOUR, 5 * 60, |_| noise.packets(100.0, 0.1));
    assert_eq!(all.len(), 1);
    // Now 40 minutes alternating 20 s at 0.8 × upper and 20 s at 1.2 × upper: it crosses the
    // upper threshold every 20 s but never drops to the lower one (halfway to the baseline).
    let start = HOUR + 5 * 60;
    all.extend(run(&mut d, &k, start, 40 * 60, |s| {
        let f = if (s / 20) % 2 == 0 { 0.8 } else { 1.2 };
        noise.packets(f * upper, 0.05)
    }));
    assert_eq!(all.len(), 1, "flapped: {all:?}");
    assert!(d.status(&k).unwrap().active);

    // Back to the background: it ends once, after the cool-down.
    let back = start + 40 * 60;
    all.extend(run(&mut d, &k, back, 15 * 60, |_| noise.packets(5.0, 0.3)));
    assert_eq!(all.len(), 2, "{all:?}");
    let (end_at, end) = &all[1];
    assert!(!end.started);
    let delay = end_at - back;
    let cool = cfg.cool_down.as_secs();
    assert!(
        delay >= cool && delay <= cool + cfg.rate_window.as_secs(),
        "ended {delay} s after the rate fell"
    );
}

#[test]
fn wobble_below_for_before_a_spike_does_not_fire() {
    let mut d = detector();
    let k = key("cart");
    let mut noise = Noise(17);
    assert!(run(&mut d, &k, 0, HOUR, |_| noise.packets(5.0, 0.3)).is_empty());
    let upper = d.status(&k).unwrap().threshold;
    // 40 s above, 40 s below the threshold: never 60 s in a row.
    let ts = run(&mut d, &k, HOUR, HOUR, |s| {
        let f = if (s / 40) % 2 == 0 { 2.0 } else { 0.3 };
        noise.packets(f * upper, 0.05)
    });
    assert!(ts.is_empty(), "{ts:?}");
}

#[test]
fn warm_up_suppresses_then_new_keys_fire_at_once() {
    let cfg = SpikeConfig::default();
    let warm = cfg.warm_up.as_secs();
    // A background of 5/s from the start, and a 6-minute flood inside the warm-up.
    let series = |noise: &mut Noise, s: u64| {
        if (3 * 60..9 * 60).contains(&s) {
            noise.packets(300.0, 0.1)
        } else {
            noise.packets(5.0, 0.3)
        }
    };
    let k = key("from-start");
    let mut d = detector();
    let mut noise = Noise(19);
    let ts = run(&mut d, &k, 0, warm + 5 * 60, |s| series(&mut noise, s));
    assert!(ts.is_empty(), "the warm-up must hide it: {ts:?}");

    // The same series without a warm-up does fire: that is what the warm-up hid.
    let mut cold = SpikeDetector::new(SpikeConfig {
        warm_up: Duration::ZERO,
        ..SpikeConfig::default()
    })
    .unwrap();
    let mut noise = Noise(19);
    let ts = run(&mut cold, &k, 0, warm + 5 * 60, |s| series(&mut noise, s));
    assert!(ts.first().is_some_and(|(_, t)| t.started), "{ts:?}");

    // After the warm-up, a workload never seen denying has a baseline of zero: its first flood
    // fires after `for`, without a warm-up of its own.
    let fresh = key("new-workload");
    let start = warm + 5 * 60;
    let ts = run(&mut d, &fresh, start, 5 * 60, |_| noise.packets(50.0, 0.1));
    assert_eq!(ts.len(), 1, "{ts:?}");
    assert!(ts[0].1.started);
    assert!(ts[0].0 - start <= cfg.for_duration.as_secs() + cfg.rate_window.as_secs());
}

#[test]
fn expected_denies_never_page_but_are_tracked() {
    let mut d = detector();
    let paging = key("cart");
    let expected = SpikeKey {
        expected: true,
        ..key("cart")
    };
    let mut noise = Noise(23);
    let mut ts = Vec::new();
    for s in 0..2 * HOUR + 30 * 60 {
        let mean = if s >= 2 * HOUR { 400.0 } else { 4.0 };
        d.observe(at(s), &paging, noise.packets(mean, 0.3));
        d.observe(at(s), &expected, noise.packets(mean, 0.3));
        ts.extend(d.tick(at(s)));
    }
    assert_eq!(ts.len(), 1, "{ts:?}");
    assert_eq!(ts[0].key, paging);
    let st = d.status(&expected).unwrap();
    assert!(st.active, "the expected series still shows its spike");
    assert!(st.rate > 300.0);
}

#[test]
fn a_long_spike_does_not_poison_the_baseline() {
    let mut d = detector();
    let k = key("cart");
    let mut noise = Noise(29);
    assert!(run(&mut d, &k, 0, 2 * HOUR, |_| noise.packets(5.0, 0.3)).is_empty());
    let (before_baseline, before_deviation) = {
        let st = d.status(&k).unwrap();
        (st.baseline, st.deviation)
    };

    // A one-hour flood at 100 × the background.
    let mut ts = run(&mut d, &k, 2 * HOUR, HOUR, |_| noise.packets(500.0, 0.1));
    let during = d.status(&k).unwrap();
    assert!(during.active);
    assert!(
        during.baseline < 2.0 * before_baseline,
        "baseline {before_baseline} → {}",
        during.baseline
    );
    assert!(during.deviation <= before_deviation + 1e-9);

    // The flood stops; the spike ends; a smaller flood (10 × background) shortly after still
    // fires. With an undamped one-hour half-life the baseline would be ~250/s by now.
    ts.extend(run(&mut d, &k, 3 * HOUR, 10 * 60, |_| {
        noise.packets(5.0, 0.3)
    }));
    ts.extend(run(&mut d, &k, 3 * HOUR + 10 * 60, 5 * 60, |_| {
        noise.packets(50.0, 0.1)
    }));
    let kinds: Vec<bool> = ts.iter().map(|(_, t)| t.started).collect();
    assert_eq!(kinds, vec![true, false, true], "{ts:?}");
}

#[test]
fn a_permanent_level_shift_is_eventually_absorbed() {
    // Short half-life so the test runs quickly: the mechanism is the same.
    let cfg = SpikeConfig {
        half_life: Duration::from_secs(60),
        warm_up: Duration::from_secs(300),
        ..SpikeConfig::default()
    };
    let mut d = SpikeDetector::new(cfg).unwrap();
    let k = key("cart");
    let mut noise = Noise(31);
    assert!(run(&mut d, &k, 0, 1800, |_| noise.packets(5.0, 0.3)).is_empty());
    let ts = run(&mut d, &k, 1800, 8 * HOUR, |_| noise.packets(100.0, 0.1));
    let kinds: Vec<bool> = ts.iter().map(|(_, t)| t.started).collect();
    assert_eq!(kinds, vec![true, false], "{ts:?}");
    assert!(!d.status(&k).unwrap().active);
}

#[test]
fn diurnal_swing_never_fires() {
    // 10× between night and day, over three days: the 1 h baseline follows it.
    let mut d = detector();
    let k = key("frontend");
    let mut noise = Noise(37);
    let ts = run(&mut d, &k, 0, 72 * HOUR, |s| {
        let phase = 2.0 * std::f64::consts::PI * s as f64 / (24.0 * HOUR as f64);
        noise.packets(10.0 * 10f64.powf(0.5 * phase.sin()), 0.5)
    });
    assert!(ts.is_empty(), "{ts:?}");
}

#[test]
fn idle_keys_are_dropped_and_reported() {
    let cfg = SpikeConfig::default();
    let mut d = detector();
    let k = key("gone");
    let other = key("alive");
    for s in 0..60 {
        d.observe(at(s), &k, 3);
    }
    let idle = cfg.idle_timeout.as_secs();
    for s in 60..idle + 120 {
        d.observe(at(s), &other, 1);
        assert!(d.tick(at(s)).is_empty());
    }
    assert!(d.status(&k).is_none());
    assert!(d.status(&other).is_some());
    assert_eq!(d.take_dropped(), vec![k]);
    assert!(d.take_dropped().is_empty());
}

#[test]
fn the_key_table_is_bounded() {
    let mut d = SpikeDetector::new(SpikeConfig {
        max_keys: 3,
        ..SpikeConfig::default()
    })
    .unwrap();
    for i in 0..5 {
        d.observe(at(0), &key(&format!("w{i}")), 1);
    }
    assert_eq!(d.len(), 3);
    assert_eq!(d.overflowed(), 2);
}

#[test]
fn a_clock_going_backwards_is_harmless() {
    let mut d = detector();
    let k = key("cart");
    for s in 0..100 {
        d.observe(at(s), &k, 5);
        d.tick(at(s));
    }
    for s in (0..50).rev() {
        d.observe(at(s), &k, 5);
        assert!(d.tick(at(s)).is_empty());
    }
    let st = d.status(&k).unwrap();
    assert!(st.baseline.is_finite() && st.deviation.is_finite() && st.rate.is_finite());
}
