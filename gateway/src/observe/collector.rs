//! One metric written from a scrape-time collector: its descriptor, then its value.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};

/// Writes `metric` under `name` with its help text (no unit), as collectors read at scrape
/// time do for each series they own.
pub(crate) fn encode<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &M,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}
