//! An HTTP/1.x request from its header to the stream kept for the next one, in place of
//! Pingora's `HttpProxy` (see `listen`): the same steps it takes for a request answered
//! in `request_filter`, with the gateway's stages called directly instead of through
//! boxed hooks.

use super::Gateway;
use crate::listen::Serve;
use pingora_core::apps::{HttpPersistentSettings, ReusedHttpStream};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::{ProxyHttp, Session};

impl Serve for Gateway {
    async fn serve(
        &self,
        mut session: Session,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if *shutdown.borrow() {
            // The connection closes after this answer.
            session.set_keepalive(None);
        }
        let mut ctx = self.new_ctx();
        match self.answer(&mut session, &mut ctx).await {
            Ok(()) => {
                self.record(&session, None, &mut ctx);
                // What the request held is given back before the connection waits for
                // the next one.
                drop(ctx);
                let settings = HttpPersistentSettings::for_session(&session.downstream_session);
                let reusable = session.downstream_session.finish().await.ok().flatten()?;
                Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
            }
            Err(e) => {
                // As Pingora's proxy ends a request whose filter failed: an error status
                // when no answer started, the error logged, the connection not kept.
                let failed = self.fail_to_proxy(&mut session, &e, &mut ctx).await;
                log::error!(
                    "Fail to filter request: {e}, status: {}, {}",
                    failed.error_code,
                    self.request_summary(&session, &ctx)
                );
                self.record(&session, Some(&e), &mut ctx);
                session.downstream_session.on_proxy_failure(e);
                None
            }
        }
    }
}
