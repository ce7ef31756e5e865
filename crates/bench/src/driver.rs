//! The closed-loop driver of the per-order benchmarks: `n` tasks, each with a client of its
//! own (a connection, opened before the clock starts), take the next order from a shared
//! queue (an atomic index) until none is left, and time each order.
//!
//! The first error stops the run: the failing task empties the queue, so that the others
//! finish the order in hand and stop, and that error is returned.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One task's way of placing an order.
pub trait Client: Send + 'static {
    type Order: Send + Sync + 'static;

    /// Places `order`; true when it was granted, false when refused.
    fn place(&mut self, order: &Self::Order) -> impl Future<Output = Result<bool>> + Send;
}

/// What happened to one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub granted: bool,
    /// From the start of `place` to its answer.
    pub latency: Duration,
}

/// A finished run: its length and every order's outcome, in the orders' order.
#[derive(Debug)]
pub struct Driven {
    pub elapsed: Duration,
    pub outcomes: Vec<Outcome>,
}

impl Driven {
    pub fn refused(&self) -> usize {
        self.outcomes.iter().filter(|o| !o.granted).count()
    }
}

/// Runs every order of `orders` through `clients` (one task each); `progress` advances by
/// one per order.
pub async fn run<C: Client>(
    clients: Vec<C>,
    orders: Arc<Vec<C::Order>>,
    progress: &ProgressBar,
) -> Result<Driven> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let (orders, next, progress) = (orders.clone(), next.clone(), progress.clone());
            tokio::spawn(async move {
                let mut done: Vec<(usize, Outcome)> = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(order) = orders.get(i) else { break };
                    let t = Instant::now();
                    match client.place(order).await {
                        Ok(granted) => done.push((
                            i,
                            Outcome {
                                granted,
                                latency: t.elapsed(),
                            },
                        )),
                        Err(e) => {
                            next.store(usize::MAX / 2, Ordering::Relaxed);
                            return Err(e.context(format!("order #{i}")));
                        }
                    }
                    progress.inc(1);
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; orders.len()];
    let mut first_err = None;
    for t in tasks {
        match t.await.context("a client task panicked") {
            Ok(Ok(done)) => {
                for (i, o) in done {
                    outcomes[i] = Some(o);
                }
            }
            Ok(Err(e)) | Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let elapsed = start.elapsed();
    if let Some(e) = first_err {
        return Err(e);
    }
    let outcomes = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.with_context(|| format!("order #{i} was never placed")))
        .collect::<Result<Vec<_>>>()?;
    Ok(Driven { elapsed, outcomes })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grants even numbers, fails on 13 when asked to.
    struct Even {
        fail: bool,
    }

    impl Client for Even {
        type Order = u32;
        async fn place(&mut self, order: &u32) -> Result<bool> {
            tokio::task::yield_now().await;
            anyhow::ensure!(!(self.fail && *order == 13), "thirteen");
            Ok(order & 1 == 0)
        }
    }

    #[tokio::test]
    async fn every_order_once_in_order() {
        let orders: Arc<Vec<u32>> = Arc::new((0..100).collect());
        let clients = (0..7).map(|_| Even { fail: false }).collect();
        let d = run(clients, orders, &ProgressBar::hidden()).await.unwrap();
        assert_eq!(d.outcomes.len(), 100);
        assert!(d
            .outcomes
            .iter()
            .enumerate()
            .all(|(i, o)| o.granted == (i & 1 == 0)));
        assert_eq!(d.refused(), 50);
    }

    #[tokio::test]
    async fn the_first_error_stops_the_run() {
        let orders: Arc<Vec<u32>> = Arc::new((0..10_000).collect());
        let clients = (0..3).map(|_| Even { fail: true }).collect();
        let e = run(clients, orders, &ProgressBar::hidden())
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("thirteen"), "{e:#}");
    }
}
