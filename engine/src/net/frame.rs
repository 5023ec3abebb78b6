//! Reading and writing protocol frames on QUIC streams.

use crate::proto::{FRAME_HEADER, Message, ProtocolError, decode_frame_header};
use bytes::Bytes;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Read(#[from] quinn::ReadExactError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Reads the next message from `stream`; `None` when the stream ended cleanly between frames.
pub async fn read_frame(stream: &mut quinn::RecvStream) -> Result<Option<Message>, FrameError> {
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

/// Writes one message.
pub async fn write_message(
    stream: &mut quinn::SendStream,
    message: &Message,
) -> Result<(), quinn::WriteError> {
    stream.write_all(&message.encode()).await
}
