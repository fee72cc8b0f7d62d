"""`upernet serve`: an HTTP API and a web page around a `Segmenter` (needs the `upernet[serve]` extra).

    from upernet import Segmenter
    from upernet.serve.app import Limits, create_app
    app = create_app(Segmenter("runs/demo/model"), Limits(max_pixels=20_000_000))
    uvicorn.run(app, host="127.0.0.1", port=8000)

`app.py` has the routes and the upload checks, `batching.py` the inference thread, `static/` the page.
"""
