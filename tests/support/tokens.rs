//! Test token issuers: signing keys made at test time, JWTs signed with them, and a JWKS
//! served by a local HTTP server.
