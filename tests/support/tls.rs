//! Test PKI and TLS clients: a CA and leaf certificates made at test time (rcgen), and
//! HTTP/1.1 and h2 clients over TLS that verify the chain.
