//! The waiting room of `pipefuse serve`: a bounded queue of jobs that hands them to the cluster
//! fairly across clients (round robin over clients, first come first served within one), with no
//! I/O, so its rules are tested directly.

use std::collections::{HashMap, VecDeque};

/// Jobs waiting for the cluster, per client, served round robin.
#[derive(Debug)]
pub(crate) struct FairQueue<T> {
    capacity: usize,
    per_client: usize,
    /// Each client's waiting jobs, oldest first.
    waiting: HashMap<String, VecDeque<T>>,
    /// Clients with waiting jobs, in the order they are served next.
    turn: VecDeque<String>,
    len: usize,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum QueueFull {
    /// The queue holds its capacity.
    All {
        /// How many jobs wait.
        waiting: usize,
    },
    /// This client already has its share waiting.
    Client {
        /// How many of its jobs wait.
        waiting: usize,
    },
}

impl<T> FairQueue<T> {
    /// An empty queue that holds at most `capacity` jobs, at most `per_client` of one client.
    pub(crate) fn new(capacity: usize, per_client: usize) -> FairQueue<T> {
        FairQueue {
            capacity,
            per_client,
            waiting: HashMap::new(),
            turn: VecDeque::new(),
            len: 0,
        }
    }

    /// Jobs waiting.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether one more job would be refused.
    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Queues `job` of `client` behind that client's earlier jobs; refused when full.
    pub(crate) fn push(&mut self, client: &str, job: T) -> Result<(), QueueFull> {
        if self.is_full() {
            return Err(QueueFull::All { waiting: self.len });
        }
        let mine = self.waiting.entry(client.to_string()).or_default();
        if mine.len() >= self.per_client {
            return Err(QueueFull::Client {
                waiting: mine.len(),
            });
        }
        if mine.is_empty() {
            self.turn.push_back(client.to_string());
        }
        mine.push_back(job);
        self.len += 1;
        Ok(())
    }

    /// The next job to run: the oldest of the client whose turn it is; that client then goes to
    /// the back of the line.
    pub(crate) fn pop(&mut self) -> Option<(String, T)> {
        let client = self.turn.pop_front()?;
        let mine = self.waiting.get_mut(&client)?;
        let job = mine.pop_front()?;
        if mine.is_empty() {
            self.waiting.remove(&client);
        } else {
            self.turn.push_back(client.clone());
        }
        self.len -= 1;
        Some((client, job))
    }

    /// Takes out the first waiting job for which `matches` holds (a cancelled one).
    pub(crate) fn remove(&mut self, mut matches: impl FnMut(&T) -> bool) -> Option<T> {
        let (client, i) = self
            .waiting
            .iter()
            .find_map(|(c, q)| q.iter().position(&mut matches).map(|i| (c.clone(), i)))?;
        let mine = self.waiting.get_mut(&client)?;
        let job = mine.remove(i)?;
        if mine.is_empty() {
            self.waiting.remove(&client);
            self.turn.retain(|c| c != &client);
        }
        self.len -= 1;
        Some(job)
    }

    /// How many jobs run before `matches`' job, counting the rounds of the other clients.
    pub(crate) fn position(&self, mut matches: impl FnMut(&T) -> bool) -> Option<usize> {
        let (client, i) = self
            .waiting
            .iter()
            .find_map(|(c, q)| q.iter().position(&mut matches).map(|i| (c, i)))?;
        let turn = self.turn.iter().position(|c| c == client)?;
        // Full rounds before this job's round, plus the clients served earlier in that round.
        let ahead: usize = self
            .turn
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let n = self.waiting.get(c).map_or(0, VecDeque::len);
                if k < turn {
                    n.min(i + 1)
                } else {
                    n.min(i)
                }
            })
            .sum();
        Some(ahead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_take_turns_and_each_keeps_its_order() {
        let mut q = FairQueue::new(10, 10);
        for j in ["a1", "a2", "a3"] {
            q.push("a", j).unwrap();
        }
        q.push("b", "b1").unwrap();
        q.push("c", "c1").unwrap();
        q.push("b", "b2").unwrap();
        let order: Vec<&str> = std::iter::from_fn(|| q.pop().map(|(_, j)| j)).collect();
        assert_eq!(order, ["a1", "b1", "c1", "a2", "b2", "a3"]);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_full_queue_refuses_and_frees_a_place_when_one_leaves() {
        let mut q = FairQueue::new(2, 2);
        q.push("a", 1).unwrap();
        q.push("b", 2).unwrap();
        assert_eq!(q.push("c", 3), Err(QueueFull::All { waiting: 2 }));
        assert_eq!(q.pop(), Some(("a".to_string(), 1)));
        q.push("c", 3).unwrap();
        assert!(q.is_full());
    }

    #[test]
    fn one_client_cannot_take_more_than_its_share() {
        let mut q = FairQueue::new(10, 2);
        q.push("a", 1).unwrap();
        q.push("a", 2).unwrap();
        assert_eq!(q.push("a", 3), Err(QueueFull::Client { waiting: 2 }));
        q.push("b", 4).unwrap();
        assert_eq!(q.pop().map(|x| x.1), Some(1));
        q.push("a", 3).unwrap();
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn removing_a_job_keeps_the_others_turns() {
        let mut q = FairQueue::new(10, 10);
        q.push("a", 1).unwrap();
        q.push("b", 2).unwrap();
        q.push("a", 3).unwrap();
        assert_eq!(q.remove(|&j| j == 2), Some(2));
        assert_eq!(q.remove(|&j| j == 2), None);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop().map(|x| x.1), Some(1));
        assert_eq!(q.pop().map(|x| x.1), Some(3));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn position_is_the_number_of_jobs_served_before() {
        let mut q = FairQueue::new(10, 10);
        for (c, j) in [("a", 1), ("a", 2), ("a", 3), ("b", 4), ("c", 5), ("b", 6)] {
            q.push(c, j).unwrap();
        }
        // Service order: 1 4 5 2 6 3.
        let order = [1, 4, 5, 2, 6, 3];
        for (k, j) in order.iter().enumerate() {
            assert_eq!(q.position(|x| x == j), Some(k), "job {j}");
        }
        assert_eq!(q.position(|&x| x == 9), None);
        let all: Vec<i32> = std::iter::from_fn(|| q.pop().map(|x| x.1)).collect();
        assert_eq!(all, order);
    }
}
