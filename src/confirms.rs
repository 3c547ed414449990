//! Publisher confirms on an AMQP channel, as a stream of what the broker said: shared by the
//! AMQP republish destination and the dead-letter replay.

use amqprs::{
    callbacks::ChannelCallback, channel::Channel, Ack, BasicProperties, Cancel, CloseChannel, Nack,
    Return,
};
use tokio::sync::mpsc;

/// What the broker said about published messages.
#[derive(Debug)]
pub enum Confirm {
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
    },
    /// Unroutable (mandatory); the ack for it follows.
    Returned {
        message_id: String,
        reason: String,
    },
    Closed(String),
}

/// Forwards the channel's confirms to the publisher.
pub struct Confirms(pub mpsc::UnboundedSender<Confirm>);

#[async_trait::async_trait]
impl ChannelCallback for Confirms {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Confirm::Closed(close.to_string()));
        Ok(())
    }
    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        let _ = self.0.send(Confirm::Ack {
            tag: ack.delivery_tag(),
            multiple: ack.mutiple(),
        });
    }
    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        let _ = self.0.send(Confirm::Nack {
            tag: nack.delivery_tag(),
            multiple: nack.multiple(),
        });
    }
    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: Return,
        properties: BasicProperties,
        _content: Vec<u8>,
    ) {
        let _ = self.0.send(Confirm::Returned {
            message_id: properties.message_id().cloned().unwrap_or_default(),
            reason: format!("{} {}", ret.reply_code(), ret.reply_text()),
        });
    }
}
