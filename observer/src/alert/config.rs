//! Alert-stage configuration: defaults, validation, and the `deny-observer run` flags.

use std::path::PathBuf;
use std::time::Duration;

use super::AlertError;
use super::edges::EdgeConfig;
use super::expected::ExpectedEdge;
use super::spike::SpikeConfig;

/// Everything the alert stage needs; build it from [`AlertArgs`] or by hand in tests.
#[derive(Clone, Debug, Default)]
pub struct AlertConfig {
    /// Spike detector settings.
    pub spike: SpikeConfig,
    /// New-denied-edge tracker settings.
    pub edges: EdgeConfig,
    /// Edges whose denies are expected (never page), from `--expected-edge`.
    pub expected_edges: Vec<ExpectedEdge>,
}

/// Default directory for the new-edge state file (a hostPath in the DaemonSet).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/deny-observer";

/// Flags of `deny-observer run` for deny-spike and new-edge alerting.
///
/// Every duration takes plain seconds (`90`, `0.5`) or a suffixed value (`500ms`, `30s`, `10m`,
/// `1h`, `7d`), so end-to-end tests can shrink all windows to seconds.
#[derive(Clone, Debug, clap::Args)]
pub struct AlertArgs {
    /// A spike needs a deny rate above baseline × this factor.
    #[arg(long, default_value_t = 3.0, value_parser = parse_positive_f64)]
    pub spike_factor: f64,
    /// ... and above baseline + this many (exponentially weighted) standard deviations.
    #[arg(long, default_value_t = 4.0, value_parser = parse_non_negative_f64)]
    pub spike_sigma: f64,
    /// ... and above this absolute floor, in packets per second.
    #[arg(long, default_value_t = 1.0, value_parser = parse_non_negative_f64)]
    pub spike_floor: f64,
    /// How long the rate must stay above the threshold before a spike starts.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub spike_for: Duration,
    /// How long the rate must stay below the lower (hysteresis) threshold before a spike ends.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub spike_cool_down: Duration,
    /// No spike starts until the detector has watched this long (since daemon start).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub spike_warmup: Duration,
    /// Window over which the current deny rate is averaged (whole seconds, at least 1 s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub spike_rate_window: Duration,
    /// Half-life of the exponentially weighted baseline mean and deviation.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub baseline_half_life: Duration,
    /// Directory holding the new-denied-edge state file (`denied-edges.json`).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// An edge not denied within this window counts as new again.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub edge_retention: Duration,
    /// Learning period for new denied edges, counted from the creation of the state file (it
    /// is stored there, so a restart continues it): edges first denied during it are recorded
    /// as known and never counted on `deny_observer_new_denied_edges_total`, so a first start
    /// on a cluster with existing denies does not page for each of them. `0s` turns it off.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub edge_learning: Duration,
    /// An edge whose denies are expected and never page (repeatable):
    /// `SRC_NS/SRC_WORKLOAD->DST_NS/DST_WORKLOAD[:PROTO[/PORT]]`, `*` matches any segment.
    #[arg(long = "expected-edge", value_parser = parse_expected_edge)]
    pub expected_edges: Vec<ExpectedEdge>,
}

impl AlertArgs {
    /// Validated configuration (the detector's other knobs keep their defaults).
    pub fn to_config(&self) -> Result<AlertConfig, AlertError> {
        let spike = SpikeConfig {
            factor: self.spike_factor,
            sigma: self.spike_sigma,
            floor: self.spike_floor,
            for_duration: self.spike_for,
            cool_down: self.spike_cool_down,
            warm_up: self.spike_warmup,
            rate_window: self.spike_rate_window,
            half_life: self.baseline_half_life,
            ..SpikeConfig::default()
        };
        spike.validate()?;
        let edges = EdgeConfig {
            retention: self.edge_retention,
            learning: self.edge_learning,
            state_dir: Some(self.state_dir.clone()),
            ..EdgeConfig::default()
        };
        edges.validate()?;
        Ok(AlertConfig {
            spike,
            edges,
            expected_edges: self.expected_edges.clone(),
        })
    }
}

/// Parses `90`, `1.5`, `500ms`, `30s`, `10m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, AlertError> {
    let bad = |why: &str| AlertError::InvalidDuration {
        value: text.to_owned(),
        reason: why.to_owned(),
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(bad(
            "expected a number, optionally followed by ms, s, m, h or d",
        ));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| bad("not a number (use e.g. 90, 1.5, 30s, 10m, 1h, 7d)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(bad("unknown unit (use ms, s, m, h or d)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| bad("out of range"))
}

fn parse_f64(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{text:?} is not a finite number"));
    }
    Ok(v)
}

/// clap parser for a finite number > 0.
pub fn parse_positive_f64(text: &str) -> Result<f64, String> {
    let v = parse_f64(text)?;
    if v <= 0.0 {
        return Err(format!("{text:?} must be greater than 0"));
    }
    Ok(v)
}

/// clap parser for a finite number ≥ 0.
pub fn parse_non_negative_f64(text: &str) -> Result<f64, String> {
    let v = parse_f64(text)?;
    if v < 0.0 {
        return Err(format!("{text:?} must not be negative"));
    }
    Ok(v)
}

/// clap parser for `--expected-edge`.
pub fn parse_expected_edge(text: &str) -> Result<ExpectedEdge, AlertError> {
    text.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        alert: AlertArgs,
    }

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        for bad in ["", "s", "-1", "1x", "1..2", "abc"] {
            let err = parse_duration(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let cfg = cli.alert.to_config().unwrap();
        assert_eq!(cfg.spike.factor, 3.0);
        assert_eq!(cfg.spike.sigma, 4.0);
        assert_eq!(cfg.spike.floor, 1.0);
        assert_eq!(cfg.spike.for_duration, Duration::from_secs(60));
        assert_eq!(cfg.spike.cool_down, Duration::from_secs(120));
        assert_eq!(cfg.spike.warm_up, Duration::from_secs(600));
        assert_eq!(cfg.spike.half_life, Duration::from_secs(3600));
        assert_eq!(cfg.edges.retention, Duration::from_secs(7 * 86400));
        assert_eq!(
            cfg.edges.state_dir.as_deref(),
            Some(std::path::Path::new(DEFAULT_STATE_DIR))
        );
        // The hand-built defaults agree with the CLI ones.
        let d = AlertConfig::default();
        assert_eq!(d.spike.factor, cfg.spike.factor);
        assert_eq!(d.spike.for_duration, cfg.spike.for_duration);
        assert_eq!(d.spike.warm_up, cfg.spike.warm_up);
        assert_eq!(d.edges.retention, cfg.edges.retention);
    }

    #[test]
    fn short_values_for_end_to_end_tests() {
        let cli = Cli::try_parse_from([
            "x",
            "--spike-factor",
            "2",
            "--spike-for",
            "3",
            "--spike-warmup",
            "5s",
            "--baseline-half-life",
            "30",
            "--spike-rate-window",
            "2",
            "--state-dir",
            "/tmp/x",
            "--edge-retention",
            "60",
            "--expected-edge",
            "monitoring/*->*/*:TCP/9100",
            "--expected-edge",
            "a/b->c/d",
        ])
        .unwrap();
        let cfg = cli.alert.to_config().unwrap();
        assert_eq!(cfg.spike.factor, 2.0);
        assert_eq!(cfg.spike.for_duration, Duration::from_secs(3));
        assert_eq!(cfg.spike.warm_up, Duration::from_secs(5));
        assert_eq!(cfg.spike.half_life, Duration::from_secs(30));
        assert_eq!(cfg.spike.rate_window, Duration::from_secs(2));
        assert_eq!(cfg.edges.retention, Duration::from_secs(60));
        assert_eq!(cfg.expected_edges.len(), 2);
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        let err = Cli::try_parse_from(["x", "--expected-edge", "a/b-c/d"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("a/b-c/d"), "{err}");
        let err = Cli::try_parse_from(["x", "--spike-factor", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("greater than 0"), "{err}");
        let err = Cli::try_parse_from(["x", "--spike-for", "1y"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown unit"), "{err}");
        let cli = Cli::try_parse_from(["x", "--spike-rate-window", "0.2"]).unwrap();
        let err = cli.alert.to_config().unwrap_err().to_string();
        assert!(err.contains("rate window"), "{err}");
    }
}
