mod support;
use support::*;

#[tokio::test]
async fn routes_and_splits() {
    let blue = Model::start("blue").await;
    let router = Router::start(&endpoint(
        "fraud",
        &format!("[{{name: blue, replicas: ['{}']}}]", blue.addr),
    ))
    .await;
    let (parts, body) = send(
        scoring("POST", &router.url("/api/v1/service/fraud/score?x=1"))
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200, "{body:?}");
    assert_eq!(model_of(&body), "blue");
    assert_eq!(blue.last_target(), "/score?x=1");
    router.shutdown().await;
}
