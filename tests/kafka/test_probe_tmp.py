def test_probe(probe_fx, pg_url):
    import kafka
    print("KAFKA", kafka.__file__)
    from kafka import KafkaConsumer  # noqa
