//! Ordered work queues drained by worker loops on tokio's blocking pool.
//!
//! An object's frames are queued in order; up to `max` loops (each holding one of the
//! repository's CPU permits) take them from the front and keep going while there are
//! frames, so consecutive frames need no hand-off through the async task that queued them
//! (which, on a busy machine, may wait for a time slice). Because frames are taken in
//! order, a loop waiting in `HashChain` for an earlier frame always waits for a frame
//! another running loop already holds: no deadlock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// Queue of jobs `J` for one object, processed by `work`.
pub(crate) struct WorkQueue<J> {
    state: Mutex<QueueState<J>>,
    work: Box<dyn Fn(J) + Send + Sync>,
}

struct QueueState<J> {
    jobs: VecDeque<J>,
    workers: usize,
}

impl<J: Send + 'static> WorkQueue<J> {
    pub fn new(work: impl Fn(J) + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(WorkQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                workers: 0,
            }),
            work: Box::new(work),
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState<J>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job and makes sure a loop will run it: starts the first loop (waiting
    /// for a CPU permit if need be), or another one up to `max` if a permit is free now.
    pub async fn push(
        self: &Arc<Self>,
        job: J,
        cpu: &Arc<Semaphore>,
        max: usize,
    ) -> Result<(), AcquireError> {
        let first = {
            let mut q = self.lock();
            q.jobs.push_back(job);
            if q.workers == 0 {
                // Reserved under the lock, so no job is ever left without a loop.
                q.workers += 1;
                Some(true)
            } else if q.workers < max {
                Some(false)
            } else {
                None
            }
        };
        match first {
            Some(true) => match cpu.clone().acquire_owned().await {
                Ok(permit) => self.spawn(permit),
                Err(e) => {
                    self.lock().workers -= 1;
                    return Err(e);
                }
            },
            Some(false) => {
                if let Ok(permit) = cpu.clone().try_acquire_owned() {
                    self.lock().workers += 1;
                    self.spawn(permit);
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Drops every job not yet taken (their result senders close).
    pub fn clear(&self) {
        self.lock().jobs.clear();
    }

    fn spawn(self: &Arc<Self>, permit: OwnedSemaphorePermit) {
        let queue = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            loop {
                let job = {
                    let mut q = queue.lock();
                    match q.jobs.pop_front() {
                        Some(j) => j,
                        None => {
                            q.workers -= 1;
                            return;
                        }
                    }
                };
                (queue.work)(job);
            }
        });
    }
}
