//! Retry policy, as pure functions: what an answer means, and how long to wait before the next
//! attempt (schedule, jitter, `Retry-After` within bounds).

use std::time::Duration;

/// Never retry sooner than this, whatever a `Retry-After` says (no tight loops).
pub const MIN_DELAY: Duration = Duration::from_secs(1);

/// What one attempt's answer means for its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again later; the provider may have said when.
    Retry {
        retry_after: Option<Duration>,
    },
    /// Never going to work as it is (kept for replay).
    Dead,
}

/// 2xx: delivered; 408, 429 and 5xx: retry; anything else (other 4xx, 3xx): dead at once.
pub fn classify_status(status: u16, retry_after: Option<Duration>) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 429 | 500..=599 => Verdict::Retry { retry_after },
        _ => Verdict::Dead,
    }
}

/// The knobs of [`next_delay`] that do not change per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Each delay is spread by up to this percentage either way.
    pub jitter_percent: u8,
    /// A `Retry-After` longer than this is cut to it.
    pub max_retry_after: Duration,
}

/// The delay before the next attempt, after `failed_attempts` (≥ 1) attempts failed, or `None`
/// when the schedule is exhausted (the row is dead). `schedule[n-1]` follows the n-th failure,
/// spread by ± `jitter_percent` using `random` (uniform in [0, 1)). A `Retry-After` replaces the
/// scheduled delay, clamped to [`MIN_DELAY`, `max_retry_after`]; it never extends the schedule.
pub fn next_delay(
    schedule: &[Duration],
    failed_attempts: u32,
    retry_after: Option<Duration>,
    policy: &RetryPolicy,
    random: f64,
) -> Option<Duration> {
    let index = usize::try_from(failed_attempts.checked_sub(1)?).ok()?;
    let scheduled = *schedule.get(index)?;
    if let Some(asked) = retry_after {
        return Some(asked.clamp(MIN_DELAY, policy.max_retry_after.max(MIN_DELAY)));
    }
    let spread = f64::from(policy.jitter_percent.min(100)) / 100.0;
    let factor = 1.0 + spread * (2.0 * random.clamp(0.0, 1.0) - 1.0);
    Some(scheduled.mul_f64(factor.max(0.0)))
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3), relative to `now_ms`.
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let ms = at.timestamp_millis().saturating_sub(now_ms);
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// A schedule as stored with each outbox row: comma-separated milliseconds.
pub fn schedule_text(schedule: &[Duration]) -> String {
    schedule
        .iter()
        .map(|d| d.as_millis().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The inverse of [`schedule_text`]; unreadable entries are skipped.
pub fn parse_schedule(text: &str) -> Vec<Duration> {
    text.split(',')
        .filter_map(|ms| ms.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    const POLICY: RetryPolicy = RetryPolicy {
        jitter_percent: 20,
        max_retry_after: Duration::from_secs(3600),
    };

    #[test]
    fn statuses_are_classified_as_delivered_retry_or_dead() {
        for s in [200, 201, 204, 299] {
            assert_eq!(classify_status(s, None), Verdict::Delivered, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 599] {
            assert_eq!(
                classify_status(s, None),
                Verdict::Retry { retry_after: None },
                "{s}"
            );
        }
        for s in [301, 400, 401, 403, 404, 409, 410, 422] {
            assert_eq!(classify_status(s, None), Verdict::Dead, "{s}");
        }
    }

    #[test]
    fn the_nth_failure_waits_the_nth_step_and_the_schedule_runs_out() {
        let schedule = [secs(5), secs(30), secs(120)];
        let exact = RetryPolicy {
            jitter_percent: 0,
            ..POLICY
        };
        assert_eq!(next_delay(&schedule, 1, None, &exact, 0.9), Some(secs(5)));
        assert_eq!(next_delay(&schedule, 2, None, &exact, 0.1), Some(secs(30)));
        assert_eq!(next_delay(&schedule, 3, None, &exact, 0.5), Some(secs(120)));
        assert_eq!(next_delay(&schedule, 4, None, &exact, 0.5), None);
        assert_eq!(next_delay(&[], 1, None, &exact, 0.5), None);
        assert_eq!(next_delay(&schedule, 0, None, &exact, 0.5), None);
    }

    #[test]
    fn jitter_stays_within_the_configured_spread() {
        let schedule = [secs(100)];
        assert_eq!(next_delay(&schedule, 1, None, &POLICY, 0.0), Some(secs(80)));
        assert_eq!(
            next_delay(&schedule, 1, None, &POLICY, 0.5),
            Some(secs(100))
        );
        for _ in 0..1000 {
            let d = next_delay(&schedule, 1, None, &POLICY, fastrand::f64()).unwrap();
            assert!(d >= secs(80) && d <= secs(120), "{d:?}");
        }
        let full = RetryPolicy {
            jitter_percent: 100,
            ..POLICY
        };
        assert_eq!(next_delay(&schedule, 1, None, &full, 0.0), Some(secs(0)));
    }

    #[test]
    fn retry_after_replaces_the_step_within_bounds_but_never_extends_the_schedule() {
        let schedule = [secs(5), secs(30)];
        assert_eq!(
            next_delay(&schedule, 1, Some(secs(90)), &POLICY, 0.0),
            Some(secs(90))
        );
        // Clamped: at most max_retry_after, at least MIN_DELAY.
        assert_eq!(
            next_delay(&schedule, 1, Some(secs(86_400)), &POLICY, 0.0),
            Some(secs(3600))
        );
        assert_eq!(
            next_delay(&schedule, 2, Some(secs(0)), &POLICY, 0.0),
            Some(MIN_DELAY)
        );
        assert_eq!(next_delay(&schedule, 3, Some(secs(1)), &POLICY, 0.0), None);
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        assert_eq!(parse_retry_after(" 120 ", 0), Some(secs(120)));
        // Sun, 06 Nov 1994 08:49:37 GMT = 784111777 s.
        let now = 784_111_777_000 - 30_000;
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now + 60_000),
            Some(secs(0))
        );
        assert_eq!(parse_retry_after("soon", 0), None);
        assert_eq!(parse_retry_after("-5", 0), None);
    }

    #[test]
    fn schedules_round_trip_through_their_stored_text() {
        let schedule = vec![secs(5), Duration::from_millis(1500), secs(86_400)];
        let text = schedule_text(&schedule);
        assert_eq!(text, "5000,1500,86400000");
        assert_eq!(parse_schedule(&text), schedule);
        assert!(parse_schedule("").is_empty());
    }
}
