//! The data-plane runtime of the agent and the waypoint, one choice for
//! both: `0` worker threads is one thread that polls epoll and runs the
//! ready task itself, so a request's hand-offs between tasks (HBONE
//! connection, stream, HTTP connection, pool) never cross threads: no
//! futex wake-up and no context switch per hand-off. More threads buy
//! throughput beyond one core at that cost.

/// A runtime for the data plane with `worker_threads` workers (0: the
/// calling thread alone), named `name`.
pub fn data_plane(worker_threads: usize, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    match worker_threads {
        0 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .thread_name(name)
            .enable_all()
            .build(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_workers_run_tasks_on_the_calling_thread() {
        let rt = super::data_plane(0, "t").unwrap();
        let caller = std::thread::current().id();
        let ran_on = rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await.unwrap() });
        assert_eq!(ran_on, caller);
    }

    #[test]
    fn workers_are_named_threads() {
        let rt = super::data_plane(2, "dp-test").unwrap();
        let name = rt.block_on(async {
            tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                .await
                .unwrap()
        });
        assert_eq!(name.as_deref(), Some("dp-test"));
    }
}
