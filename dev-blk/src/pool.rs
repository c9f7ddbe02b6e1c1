//! A bounded pool of I/O worker threads shared by every queue of the device.
//!
//! Queue threads parse chains and submit one job per request; workers run the blocking
//! `preadv`/`pwritev`/`fdatasync` calls, so requests of one queue proceed in parallel. The job
//! channel is bounded: a queue thread that outruns the disk blocks on submit.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One request's work.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Pending jobs the channel holds before `submit` blocks.
const BACKLOG: usize = 1024;

/// The pool could not take a job.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("starting an I/O worker thread failed")]
    Spawn(#[source] std::io::Error),
    #[error("the I/O workers are gone")]
    Stopped,
}

/// Worker threads waiting for [`Job`]s.
#[derive(Debug)]
pub struct Pool {
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> Result<Pool, PoolError> {
        let (tx, rx) = sync_channel::<Job>(BACKLOG);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for n in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let worker = std::thread::Builder::new()
                .name(format!("blk-io-{n}"))
                .stack_size(256 * 1024)
                .spawn(move || work(&rx))
                .map_err(PoolError::Spawn)?;
            workers.push(worker);
        }
        Ok(Pool {
            tx: Some(tx),
            workers,
        })
    }

    /// Queues `job` for a worker; blocks while the backlog is full.
    pub fn submit(&self, job: Job) -> Result<(), PoolError> {
        let tx = self.tx.as_ref().ok_or(PoolError::Stopped)?;
        tx.send(job).map_err(|_| PoolError::Stopped)
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        // A poisoned lock means a job panicked while another worker waited; the receiver
        // itself is intact.
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_submitted_job_runs_before_drop_returns() {
        let count = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new(3).expect("pool");
        for _ in 0..100 {
            let c = Arc::clone(&count);
            pool.submit(Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }))
            .expect("submit");
        }
        drop(pool);
        assert_eq!(count.load(Ordering::SeqCst), 100);
    }

    #[test]
    fn jobs_run_in_parallel() {
        let pool = Pool::new(2).expect("pool");
        let (tx, rx) = std::sync::mpsc::channel();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        for _ in 0..2 {
            let (b, tx) = (Arc::clone(&barrier), tx.clone());
            pool.submit(Box::new(move || {
                b.wait();
                let _ = tx.send(());
            }))
            .expect("submit");
        }
        for _ in 0..2 {
            rx.recv_timeout(std::time::Duration::from_secs(5))
                .expect("both jobs met at the barrier");
        }
    }
}
