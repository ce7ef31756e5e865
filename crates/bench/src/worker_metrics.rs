//! The workers' own Prometheus metrics, read over HTTP from their `/metrics` endpoints
//! (each in-process worker serves on a free local port): batches and messages, and the
//! time spent in the Redis script pipeline (producer) and in the PostgreSQL batch
//! transaction (consumer). Two samples, at the start and at the end of a measured span,
//! split each worker's batch cycle into that step and the rest (Kafka fetch, publish and
//! delivery reports, JSON, waiting for input).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::ops::Sub;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A free local address for a worker's endpoints (bound, read, released).
pub fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.to_string())
}

/// Counters of one worker, or summed over several.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    pub batches: f64,
    pub messages: f64,
    /// Redis script pipelines (producer): how many, seconds in total.
    pub redis_calls: f64,
    pub redis_secs: f64,
    /// PostgreSQL batch transactions (consumer): how many, seconds in total.
    pub apply_calls: f64,
    pub apply_secs: f64,
}

impl Sub for Sample {
    type Output = Sample;
    fn sub(self, o: Sample) -> Sample {
        Sample {
            batches: self.batches - o.batches,
            messages: self.messages - o.messages,
            redis_calls: self.redis_calls - o.redis_calls,
            redis_secs: self.redis_secs - o.redis_secs,
            apply_calls: self.apply_calls - o.apply_calls,
            apply_secs: self.apply_secs - o.apply_secs,
        }
    }
}

impl std::ops::AddAssign for Sample {
    fn add_assign(&mut self, o: Sample) {
        self.batches += o.batches;
        self.messages += o.messages;
        self.redis_calls += o.redis_calls;
        self.redis_secs += o.redis_secs;
        self.apply_calls += o.apply_calls;
        self.apply_secs += o.apply_secs;
    }
}

/// Reads the counters from Prometheus text (metric names of `stock_common::metrics`).
pub fn parse(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name_labels.split('{').next().unwrap_or(name_labels);
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        match name {
            "stockpipe_batch_size_count" => s.batches += v,
            "stockpipe_batch_size_sum" => s.messages += v,
            "stockpipe_redis_script_seconds_count" => s.redis_calls += v,
            "stockpipe_redis_script_seconds_sum" => s.redis_secs += v,
            "stockpipe_apply_seconds_count" => s.apply_calls += v,
            "stockpipe_apply_seconds_sum" => s.apply_secs += v,
            _ => {}
        }
    }
    s
}

/// `GET /metrics` of the worker at `addr`.
pub async fn scrape(addr: &str) -> Result<Sample> {
    let fetch = async {
        let mut conn = TcpStream::connect(addr).await?;
        conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut body = Vec::new();
        conn.read_to_end(&mut body).await?;
        anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .context("timed out")?
        .with_context(|| format!("reading http://{addr}/metrics"))?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no HTTP response from {addr}");
    };
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!(
            "{addr}/metrics answered {:?}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(parse(body))
}

/// Sum of the samples of `addrs`.
pub async fn scrape_all(addrs: &[String]) -> Result<Sample> {
    let mut total = Sample::default();
    for a in addrs {
        total += scrape(a).await?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP x\n\
            stockpipe_batch_size_sum{worker=\"producer\"} 4000\n\
            stockpipe_batch_size_count{worker=\"producer\"} 2\n\
            stockpipe_redis_script_seconds_sum{worker=\"producer\"} 0.25\n\
            stockpipe_redis_script_seconds_count{worker=\"producer\"} 2\n\
            stockpipe_redis_script_seconds_bucket{worker=\"producer\",le=\"0.5\"} 2\n";
        let s = parse(text);
        assert_eq!(s.batches, 2.0);
        assert_eq!(s.messages, 4000.0);
        assert_eq!(s.redis_secs, 0.25);
        assert_eq!(s.redis_calls, 2.0);
        assert_eq!(s.apply_calls, 0.0);
    }
}
