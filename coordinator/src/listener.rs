//! Accepted connections, bounded: at most `max_connections` open at once (more are closed on
//! accept), and a connection that sends nothing for `idle_timeout` is dropped, including one that
//! never starts its HTTP/2 or TLS handshake. Live peers are never idle that long: workers call
//! every half second, and the server pings every connection more often than the timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bounds on the connections a coordinator holds.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// Accepts on `listener` until the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> ReceiverStream<io::Result<GuardedStream>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        let mut turned_away = 0u64;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                turned_away += 1;
                if turned_away.is_power_of_two() {
                    tracing::warn!(
                        "closed a connection from {peer}: {} connections are open, the most \
                         allowed (--max-connections); {turned_away} turned away so far",
                        limits.max_connections
                    );
                }
                continue;
            };
            // Without TCP_NODELAY, small replies wait on delayed ACKs (~40 ms a step).
            let _ = stream.set_nodelay(true);
            let guarded = GuardedStream {
                inner: stream,
                idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                idle_timeout: limits.idle_timeout,
                _slot: permit,
            };
            if tx.send(Ok(guarded)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A TCP connection holding one of the listener's slots, closed when its peer stays silent.
#[derive(Debug)]
pub struct GuardedStream {
    inner: TcpStream,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let deadline = Instant::now() + this.idle_timeout;
                this.idle.as_mut().reset(deadline);
                Poll::Ready(result)
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the peer sent nothing for {:?}: connection closed",
                        this.idle_timeout
                    ),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for GuardedStream {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    async fn bound(
        limits: ConnectionLimits,
    ) -> (
        std::net::SocketAddr,
        ReceiverStream<io::Result<GuardedStream>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, incoming(listener, limits))
    }

    #[tokio::test]
    async fn silent_peers_are_dropped_and_talkative_ones_kept() {
        let idle_timeout = Duration::from_millis(300);
        let (addr, mut accepted) = bound(ConnectionLimits {
            max_connections: 4,
            idle_timeout,
        })
        .await;
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut server_side = accepted.next().await.unwrap().unwrap();
        let mut buf = [0u8; 8];
        let started = std::time::Instant::now();
        let e = server_side.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= idle_timeout);

        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut server_side = accepted.next().await.unwrap().unwrap();
        for _ in 0..4 {
            tokio::time::sleep(idle_timeout / 2).await;
            talker.write_all(b"x").await.unwrap();
            assert_eq!(server_side.read(&mut buf).await.unwrap(), 1);
        }
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed() {
        let (addr, mut accepted) = bound(ConnectionLimits {
            max_connections: 2,
            idle_timeout: Duration::from_secs(30),
        })
        .await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let held: Vec<_> = vec![
            accepted.next().await.unwrap().unwrap(),
            accepted.next().await.unwrap().unwrap(),
        ];
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        // Closed by the coordinator: end of stream (or a reset), never data.
        let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the third connection is closed at once");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(held);
        // A slot is free again.
        let _d = TcpStream::connect(addr).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), accepted.next())
                .await
                .unwrap()
                .is_some()
        );
    }
}
