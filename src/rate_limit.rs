//! Token buckets keyed by caller (credential), for the HTTP sources' rate limits.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// `rate_per_second` tokens refill continuously up to `burst`; each request takes one.
#[derive(Debug)]
pub struct RateLimiter {
    rate_per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    Allowed,
    /// Refused; a token is available again after this long (for `Retry-After`).
    Limited {
        retry_after: Duration,
    },
}

impl RateLimiter {
    /// `rate_per_second == 0` disables limiting.
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        Self {
            rate_per_second,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn check(&self, caller: &str) -> Admission {
        self.check_at(caller, Instant::now())
    }

    pub fn check_at(&self, caller: &str, now: Instant) -> Admission {
        if self.rate_per_second <= 0.0 {
            return Admission::Allowed;
        }
        let Ok(mut buckets) = self.buckets.lock() else {
            return Admission::Allowed;
        };
        let bucket = buckets.entry(caller.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_second).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Admission::Allowed
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate_per_second;
            Admission::Limited {
                retry_after: Duration::from_secs_f64(wait),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_allowed_then_limited_until_refill() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check_at("a", t0), Admission::Allowed);
        }
        assert!(matches!(
            limiter.check_at("a", t0),
            Admission::Limited { .. }
        ));
        // Other callers have their own bucket.
        assert_eq!(limiter.check_at("b", t0), Admission::Allowed);
        // Half a second at 2/s refills one token.
        assert_eq!(
            limiter.check_at("a", t0 + Duration::from_millis(500)),
            Admission::Allowed
        );
    }

    #[test]
    fn zero_rate_disables_limiting() {
        let limiter = RateLimiter::new(0.0, 1);
        for _ in 0..100 {
            assert_eq!(limiter.check("a"), Admission::Allowed);
        }
    }
}
