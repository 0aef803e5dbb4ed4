//! The test harness: throwaway PostgreSQL, Redis/Valkey and SeaweedFS servers on 127.0.0.1.
