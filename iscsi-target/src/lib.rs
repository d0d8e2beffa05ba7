//! iSCSI target over `blockcore` devices (RFC 7143). Not yet built: see the iSCSI issue.
