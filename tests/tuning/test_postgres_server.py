"""The test PostgreSQL server starts in a temporary folder, takes SQL from two connections, and stops."""

from postgres_server import PostgresServer


def test_a_throwaway_postgres_server_serves_two_connections(tmp_path):
    sqlalchemy = __import__("pytest").importorskip("sqlalchemy")
    server = PostgresServer(tmp_path)
    with server as url:
        one, two = sqlalchemy.create_engine(url), sqlalchemy.create_engine(url)
        with one.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE t (n integer PRIMARY KEY)"))
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1), (2)"))
        with two.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT sum(n) FROM t")).scalar() == 3
        one.dispose()
        two.dispose()
    assert server.stopped
