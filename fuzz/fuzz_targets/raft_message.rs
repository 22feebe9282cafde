//! What one controller accepts from another: raft messages (protobuf, raft-rs's codec) and
//! batches of them (prost), and the replicated log's command envelopes (versioned JSON) that
//! every member applies. Bytes from a peer or a damaged log must fail cleanly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protobuf::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = raft::eraftpb::Message::parse_from_bytes(data) {
        for e in m.get_entries() {
            let _ = raft::eraftpb::ConfChange::parse_from_bytes(e.get_data());
            let _ = rudder_model::store::Envelope::decode(e.get_data());
        }
    }
    let _ = <rudder_proto::v1::RaftBatch as prost::Message>::decode(data);
    let _ = rudder_model::store::Envelope::decode(data);
});
