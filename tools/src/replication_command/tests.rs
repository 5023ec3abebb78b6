use super::*;

#[test]
fn a_failover_request_goes_to_the_named_server_only() {
    let directory = tempfile::tempdir().unwrap();
    // A run directory is private to its user, as a daemon makes it.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o700);
    std::fs::set_permissions(directory.path(), private).unwrap();
    let named = directory.path().join("serve-1.sock");
    let _server = ControlSocket::bind(&named, |request| {
        serde_json::json!({"ok": serde_json::from_str::<serde_json::Value>(request).unwrap()})
    })
    .unwrap();
    let out = directory.path().join("copies/db1");
    let answer = request_test_failover("db1", None, &out, Some(&named)).unwrap();
    assert_eq!(answer["request"], "test-failover");
    assert_eq!(answer["out"], out.to_str().unwrap());
    let answer = request_unplanned_failover("db1", Some(4), true, Some(&named)).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"request": "unplanned-failover", "vm": "db1", "point": 4, "force": true})
    );
    let missing = directory.path().join("serve-2.sock");
    let error = request_test_failover("db1", None, &out, Some(&missing)).unwrap_err();
    assert!(error.contains("serve-2.sock"), "{error}");
}
