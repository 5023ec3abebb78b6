//! Reading and writing protocol frames on QUIC streams.

use crate::proto::{FRAME_HEADER, Message, ProtocolError, decode_frame_header};
use bytes::Bytes;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum FrameError {
    #[error("{0}")]
    Read(#[from] quinn::ReadExactError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Reads the next message from `stream`; `None` when the stream ended cleanly between frames.
pub(super) async fn read_frame(
    stream: &mut quinn::RecvStream,
) -> Result<Option<Message>, FrameError> {
    let mut header = [0u8; FRAME_HEADER];
    match stream.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let (kind, length) = decode_frame_header(header)?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(Some(Message::decode(kind, Bytes::from(body))?))
}

/// How long a finished control stream may wait for the peer to acknowledge its last bytes.
const DELIVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts the task that writes a connection's control messages in order. Dropping the sender
/// finishes the stream; the task ends once the peer has acknowledged everything written (a
/// goodbye, a refusal) or after a short timeout, so awaiting it before closing the connection
/// delivers the last message instead of racing it.
pub(super) fn spawn_control_writer(
    mut stream: quinn::SendStream,
) -> (
    tokio::sync::mpsc::UnboundedSender<Message>,
    tokio::task::JoinHandle<()>,
) {
    let (sender, mut queue) = tokio::sync::mpsc::unbounded_channel::<Message>();
    let task = tokio::spawn(async move {
        while let Some(message) = queue.recv().await {
            if write_message(&mut stream, &message).await.is_err() {
                return;
            }
        }
        if stream.finish().is_ok() {
            let _ = tokio::time::timeout(DELIVERY_TIMEOUT, stream.stopped()).await;
        }
    });
    (sender, task)
}

/// Writes one message.
pub(super) async fn write_message(
    stream: &mut quinn::SendStream,
    message: &Message,
) -> Result<(), quinn::WriteError> {
    stream.write_all(&message.encode()).await
}
