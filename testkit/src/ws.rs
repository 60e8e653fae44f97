//! A WebSocket echo backend.

use crate::http::{Served, serve_tcp};
use crate::net;
use futures_util::{SinkExt, StreamExt};

/// Echoes every text and binary message until the client closes.
pub async fn ws_backend() -> Served {
    let (l, _) = net::listener().await;
    serve_tcp(l, |s, _| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
            return;
        };
        while let Some(Ok(m)) = ws.next().await {
            if m.is_text() || m.is_binary() {
                if ws.send(m).await.is_err() {
                    return;
                }
            } else if m.is_close() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::Message;

    #[tokio::test]
    async fn echoes_messages() {
        let b = ws_backend().await;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", b.addr()))
            .await
            .unwrap();
        ws.send(Message::text("hi")).await.unwrap();
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), "hi");
    }
}
