//! `mesh-echo`: the echo backend (HTTP/1.1, h2, gRPC on one port; see
//! `testbed::echo`), or its gRPC client mode for tests and demos.
use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Echo backend: answers each request with the request as JSON; gRPC echo on the same port")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve (HTTP/1.1 and h2 auto-detected, gRPC by content-type).
    Serve {
        #[arg(long, default_value = "[::]:8080")]
        listen: SocketAddr,
        /// The pod name put in every answer.
        #[arg(long, env = "POD_NAME", default_value = "echo")]
        pod: String,
    },
    /// GETs `paths` one after the other on one h2 connection (prior
    /// knowledge) to `addr`; prints each answer's status and body as a
    /// JSON line.
    H2Get {
        #[arg(long)]
        addr: SocketAddr,
        paths: Vec<String>,
    },
    /// Plain TCP: answers each connection's first read, then closes
    /// (the benchmark's connection-load server).
    TcpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Keeps `concurrency` connections (connect, 1 byte each way, close) in
    /// flight against a `tcp-echo` for `seconds`; prints a JSON report.
    ConnectLoad {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long)]
        seconds: u64,
    },
    /// The soak's echo: every byte back, then the SHA-256 of what it got
    /// (`testbed::soakload`).
    SoakServe {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// The soak's client: runs the JSON commands of its stdin against a
    /// `soak-serve` (held connections, pings, loops, checksummed streams)
    /// until stdin closes; one JSON reply line each.
    SoakClient {
        #[arg(long)]
        addr: SocketAddr,
        /// Put in every payload, so a wire capture can look for plaintext.
        #[arg(long)]
        marker: String,
    },
    /// One gRPC Echo call to `addr`; prints the reply as JSON.
    GrpcClient {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "hello")]
        message: String,
    },
}

// The shipped binaries' allocator (see agent/src/main.rs), here too, so that
// the benchmark's own load and echo processes are not slowed by musl's malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match Cli::parse().cmd {
            Cmd::Serve { listen, pod } => {
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                eprintln!("mesh-echo {pod} listening on {}", l.local_addr()?);
                testbed::echo::serve(l, &pod).await;
                Ok(())
            }
            Cmd::H2Get { addr, paths } => h2_get(addr, &paths).await,
            Cmd::TcpEcho { listen } => {
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                testbed::connload::serve(l).await;
                Ok(())
            }
            Cmd::ConnectLoad {
                addr,
                concurrency,
                seconds,
            } => {
                let report = testbed::connload::run(addr, concurrency, std::time::Duration::from_secs(seconds)).await;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Cmd::SoakServe { listen } => {
                let l = listen_deep(listen).with_context(|| format!("cannot listen on {listen}"))?;
                eprintln!("soak echo listening on {}", l.local_addr()?);
                testbed::soakload::serve(l).await;
                Ok(())
            }
            Cmd::SoakClient { addr, marker } => {
                let client = testbed::soakload::Client::new(addr, &marker);
                testbed::soakload::drive(client, testbed::soakload::stdin_lines()).await;
                Ok(())
            }
            Cmd::GrpcClient { addr, message } => {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("cannot connect to {addr}"))?;
                let mut client = testbed::echo::grpc_client(tcp).await?;
                let reply = client
                    .echo(testbed::echo::pb::EchoRequest { message, fail_code: 0 })
                    .await?
                    .into_inner();
                println!(
                    "{}",
                    serde_json::json!({"message": reply.message, "pod": reply.pod, "metadata": reply.metadata})
                );
                Ok(())
            }
        }
    })
}

async fn h2_get(addr: SocketAddr, paths: &[String]) -> Result<()> {
    use http_body_util::{BodyExt, Empty};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await?;
    tokio::spawn(conn);
    for path in paths {
        let req = http::Request::get(format!("http://{addr}{path}")).body(Empty::<bytes::Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        println!(
            "{}",
            serde_json::json!({"status": status, "body": String::from_utf8_lossy(&body)})
        );
    }
    Ok(())
}

/// A listener with the deepest accept queue the netns allows
/// (`net.core.somaxconn` caps it, 4096 by default): the soak opens
/// thousands of connections at once, and tokio's `bind` asks for 1024, so
/// an accept loop that lags a moment overflowed the queue and the kernel
/// reset connections the mesh had carried (reported as mesh failures).
fn listen_deep(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(65535)
}
