# Minimal CPU image; see docs/deployment.md once the deployment work lands.
FROM python:3.11-slim
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir .
CMD ["python", "-m", "app", "explain", "--help"]
